//! clasp: CLIP-family dual encoders in Rust — load Hugging Face checkpoints,
//! embed images and texts into one space, and build search, evaluation,
//! training and serving on top.
//!
//! Layout: `model/` (architectures and loading), `preprocess/` (images and
//! text), and `encoder` (the loaded-once API the rest builds on).

pub mod data;
pub mod encoder;
pub mod error;
pub mod eval;
pub mod index;
pub mod model;
pub mod preprocess;
pub mod progress;
pub mod serve;
pub mod train;

pub use encoder::{BatchEmbeddings, Encoder, Failure};
pub use error::{Error, Result};

/// Keeps freed tensor buffers in the heap for reuse; call it first thing in
/// `main`, before any thread starts. glibc serves large allocations with fresh
/// mmaps and trims the heap top eagerly, so every tensor of a training step
/// was zero-filled page by page by the kernel: 25% of a tiny-preset step went
/// to page faults. Measured: 2.15 s -> 1.6 s per forward and backward (tiny
/// preset, batch 32). The `clasp` binary and the benches call it.
pub fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
