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

/// Where clasp keeps what it derives and can derive again (embedding and
/// feature caches, converted checkpoints): `$CLASP_CACHE_DIR`, else the
/// platform's cache folder's `clasp` (or the temporary folder's).
pub fn cache_root() -> std::path::PathBuf {
    match std::env::var_os("CLASP_CACHE_DIR") {
        Some(d) => std::path::PathBuf::from(d),
        None => dirs::cache_dir()
            .unwrap_or_else(std::env::temp_dir)
            .join("clasp"),
    }
}
