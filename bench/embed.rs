//! In-process encoder throughput for bench/embed_throughput.py.
//!
//!     cargo run --release --example bench_embed -- MODEL_DIR image|text BATCH ITERS [TEXTS_FILE [f32|int8]]
//!
//! Prints one JSON line: {"kind", "batch", "items_per_s": [per iteration]}.
//! Images are random pixel tensors (model cost only, as the PyTorch and ONNX
//! Runtime sides measure); texts go through tokenization, as they do there.

use std::time::Instant;

use candle_core::{Device, Tensor};

fn main() -> anyhow::Result<()> {
    clasp::tune_allocator();
    // SAFETY: first thing in `main`, before any thread starts.
    unsafe { clasp::tune_threads() };
    let a: Vec<String> = std::env::args().collect();
    let (model, kind, batch, iters) = (
        &a[1],
        a[2].as_str(),
        a[3].parse::<usize>()?,
        a[4].parse::<usize>()?,
    );
    let mut enc = clasp::Encoder::load(model, &Device::Cpu)?;
    if let Some(p) = a.get(6) {
        enc.set_precision(p.parse().map_err(anyhow::Error::msg)?)?;
    }
    let texts: Vec<String> = match a.get(5) {
        Some(f) => std::fs::read_to_string(f)?
            .lines()
            .take(batch)
            .map(String::from)
            .collect(),
        None => Vec::new(),
    };
    let s = enc.config().vision().image_size;
    let px = Tensor::randn(0f32, 1., (batch, 3, s, s), &Device::Cpu)?;
    let run = || -> anyhow::Result<()> {
        match kind {
            "image" => drop(enc.embed_pixels(&px)?.to_vec2::<f32>()?),
            _ => drop(enc.embed_texts(&texts)?.to_vec2::<f32>()?),
        }
        Ok(())
    };
    run()?; // warm-up
    let mut rates = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        run()?;
        rates.push(batch as f64 / t.elapsed().as_secs_f64());
    }
    println!(
        "{}",
        serde_json::json!({"kind": kind, "batch": batch, "items_per_s": rates})
    );
    Ok(())
}
