//! The foundation every clasp crate shares: the error type, atomic file
//! writes, the one seeded RNG, vector math, progress reporting, device names
//! and JSON reading. It knows no model, image or text.

pub mod atomic;
pub mod device;
pub mod error;
pub mod json;
pub mod progress;
pub mod rng;
pub mod vecmath;

pub use error::{Error, Result};
