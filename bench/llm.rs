//! Language-model speed, one configuration per run, as JSON on stdout
//! (driven by bench/llm_speed.py, which interleaves it with transformers and
//! llama.cpp):
//!
//!     cargo run --release --example bench_llm -- MODEL.gguf quantized|f32 BATCH PROMPT_TOKENS NEW_TOKENS
//!
//! Prefill: one forward pass over BATCH prompts of PROMPT_TOKENS tokens.
//! Decode: NEW_TOKENS greedy steps after it, EOS ignored, so every
//! configuration does the same work.

use std::time::Instant;

use candle_core::{Device, Tensor};
use clasp::llm::{sampling::argmax, LanguageModel, Precision};

fn main() -> anyhow::Result<()> {
    clasp::tune_allocator();
    // SAFETY: first thing in `main`, before any thread starts.
    unsafe { clasp::tune_threads() };
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 6 {
        anyhow::bail!("usage: bench_llm MODEL quantized|f32 BATCH PROMPT_TOKENS NEW_TOKENS");
    }
    let precision = match a[2].as_str() {
        "quantized" => Precision::Quantized,
        "f32" => Precision::F32,
        p => anyhow::bail!("unknown precision {p}"),
    };
    let batch: usize = a[3].parse()?;
    let prompt_len: usize = a[4].parse()?;
    let new: usize = a[5].parse()?;
    let t = Instant::now();
    let lm = LanguageModel::load(std::path::Path::new(&a[1]), precision, &Device::Cpu)?;
    let load_s = t.elapsed().as_secs_f64();
    // A real text, repeated to length, the same for every row.
    let text = "A dog runs along the beach at sunset while children build sandcastles and gulls circle overhead. ";
    let mut ids = Vec::new();
    while ids.len() < prompt_len {
        ids.extend(lm.tokenizer.encode(text, false)?);
    }
    ids.truncate(prompt_len);
    let flat: Vec<u32> = (0..batch).flat_map(|_| ids.iter().copied()).collect();
    let mut cache = lm.model.new_cache(vec![0; batch]);
    let t = Instant::now();
    let input = Tensor::from_vec(flat, (batch, prompt_len), &Device::Cpu)?;
    let mut logits = lm.model.forward_last(&input, &mut cache)?;
    let prefill_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..new {
        let rows: Vec<Vec<f32>> = logits.to_vec2()?;
        let next: Vec<u32> = rows.iter().map(|r| argmax(r)).collect();
        let input = Tensor::from_vec(next, (batch, 1), &Device::Cpu)?;
        logits = lm.model.forward_last(&input, &mut cache)?;
    }
    let decode_s = t.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "load_s": load_s,
            "prefill_tok_s": (batch * prompt_len) as f64 / prefill_s,
            "decode_tok_s": (batch * new) as f64 / decode_s,
            "kernel": format!("{:?}", clasp::llm::quant::Kernel::detect()),
        })
    );
    Ok(())
}
