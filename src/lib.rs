//! clasp: CLIP-family dual encoders in Rust — load Hugging Face checkpoints,
//! embed images and texts into one space, and build search, evaluation,
//! training and serving on top.
//!
//! Layout: `model/` (architectures and loading), `preprocess/` (images and
//! text), and `encoder` (the loaded-once API the rest builds on).

pub mod atomic;
pub mod data;
pub mod device;
pub mod encoder;
pub mod error;
pub mod eval;
pub mod export;
pub mod index;
pub mod llm;
pub mod model;
pub mod preprocess;
pub mod progress;
pub mod rag;
pub mod rng;
pub mod serve;
pub mod train;
pub mod vecmath;
pub mod vlm;

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

/// Fixes the thread count in `RAYON_NUM_THREADS` when it is unset (to the
/// cores this process may use). Call it first thing in `main`, before any
/// thread starts.
///
/// candle asks for its thread count on every f32 matmul, and without the
/// variable it finds it by reading and parsing /proc/cpuinfo each time: 5%
/// of a language-model decode step's samples were that file's text being
/// formatted by the kernel. With the variable set, rayon's pool is the same
/// size as before (it defaults to the available cores too).
pub fn tune_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        // Before any thread starts (see above), so no other thread reads the
        // environment meanwhile.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// For training: candle's element-wise ops on the calling thread. Call it
/// before any thread starts and before the first tensor op.
///
/// candle runs element-wise ops on its own thread pool (one worker fewer than
/// the cores), beside rayon's pool that runs the GEMMs and clasp's kernels.
/// Its workers spin for 25,000 rounds after every op, so on a small machine
/// they take the cores from rayon's workers, and the main thread spins again
/// waiting for them. A training step runs hundreds of such ops: 30% of a
/// tiny-preset step's samples were those two spin loops, and a step took
/// 0.745 s with the pool and 0.638 s without (median of 3 interleaved
/// rounds, 2 cores). Inference runs few of them and lost 3-5% without the
/// pool, so only `clasp train` calls this. A `CANDLE_NUM_THREADS` that is
/// set already is kept.
pub fn tune_for_training() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Before any thread starts (see above), so no other thread reads the
        // environment meanwhile.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}
