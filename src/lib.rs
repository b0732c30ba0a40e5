//! clasp: CLIP-family dual encoders, a llama-family LLM and LLaVA-style
//! vision-language models in Rust: load, embed, train, evaluate, search and
//! serve.
//!
//! This crate is the facade over the workspace's crates, which are the
//! architecture: `clasp-common` (errors, atomic writes, RNG) → `clasp-kernels`
//! (CPU GEMMs and differentiable ops) → `clasp-core` (preprocessing, encoders,
//! loading, datasets, ONNX export) and `clasp-llm` (the language model, which
//! knows no images) → `clasp-vlm` → `clasp-index` (search), `clasp-eval`,
//! `clasp-train` and `clasp-serve`. Each module below is one of them, under the
//! name the command line and the tests use.

pub use clasp_common::{atomic, device, error, progress, rng, vecmath, Error, Result};
pub use clasp_core::{data, encoder, export, model, preprocess, video};
pub use clasp_core::{BatchEmbeddings, Encoder, Failure};
pub use clasp_eval as eval;
pub use clasp_index as index;
pub use clasp_llm as llm;
pub use clasp_serve as serve;
pub use clasp_serve::rag;
pub use clasp_train as train;
pub use clasp_vlm as vlm;

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
/// cores this process may use).
///
/// # Safety
/// It sets an environment variable, which is sound only while no other
/// thread may read or write the environment: call it first thing in `main`,
/// before any thread starts (and before any candle op, whose pools read it).
/// It is `unsafe` for that reason, as `std::env::set_var` is from edition
/// 2024 on. candle offers no other way to size its pools: it reads
/// `RAYON_NUM_THREADS` and `CANDLE_NUM_THREADS` itself.
///
/// candle asks for its thread count on every f32 matmul, and without the
/// variable it finds it by reading and parsing /proc/cpuinfo each time: 5%
/// of a language-model decode step's samples were that file's text being
/// formatted by the kernel. With the variable set, rayon's pool is the same
/// size as before (it defaults to the available cores too).
pub unsafe fn tune_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        // Before any thread starts (see above), so no other thread reads the
        // environment meanwhile.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// For training: candle's element-wise ops on the calling thread.
///
/// # Safety
/// As [`tune_threads`]: call it before any thread starts and before the
/// first tensor op.
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
pub unsafe fn tune_for_training() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Before any thread starts (see above), so no other thread reads the
        // environment meanwhile.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}
