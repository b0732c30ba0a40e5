//! One BLIP-2 stage-1 training step on clasp's Q-Former, for bench/qformer.py:
//! ITC + ITM + ITG, forward and backward, at the sizes given.
//!
//!     cargo run --release --example bench_qformer -- HIDDEN LAYERS HEADS QUERIES ENCODER PATCHES BATCH TEXT ITERS [K...]
//!
//! Prints one JSON line: {"step_s": [per iteration], "losses": [itc, itm, itg],
//! "itm_ms": {K: ms}}: with K values, also the time of re-ranking one caption
//! against K photos' cached features with the ITM head (no graph), which is
//! what `--rerank itm:K` adds to a query once the photos' features are at hand.
//! Weights are random (N(0, 0.02²), LayerNorms at 1 and 0), image features
//! N(0, 1), captions random token ids: the cost only, as the PyTorch side
//! measures it.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use clasp::model::qformer::{QFormerConfig, QFormerHeads};
use clasp::train::qformer_stage1::{draw_with, itc_itm};

const VOCAB: usize = 30523;
const ITC_DIM: usize = 256;

fn main() -> anyhow::Result<()> {
    clasp::tune_allocator();
    // SAFETY: first thing in `main`, before any thread starts.
    unsafe { clasp::tune_threads() };
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    let ks: Vec<usize> = a.get(9..).unwrap_or_default().to_vec();
    let [hidden, layers, heads, queries, encoder, patches, batch, text, iters] =
        a[..a.len().min(9)]
    else {
        anyhow::bail!("HIDDEN LAYERS HEADS QUERIES ENCODER PATCHES BATCH TEXT ITERS");
    };
    let cfg: QFormerConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": VOCAB, "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads, "intermediate_size": 4 * hidden,
        "encoder_hidden_size": encoder, "use_qformer_text_input": true,
    }))?;
    let dev = Device::Cpu;
    let mut shapes: Vec<(String, Vec<usize>)> = cfg
        .param_shapes()
        .into_iter()
        .map(|(k, s)| (format!("qformer.{k}"), s))
        .collect();
    let h = hidden;
    for (k, s) in [
        ("query_tokens", vec![1, queries, h]),
        ("embeddings.word_embeddings.weight", vec![VOCAB, h]),
        ("embeddings.position_embeddings.weight", vec![512, h]),
        ("vision_projection.weight", vec![ITC_DIM, h]),
        ("vision_projection.bias", vec![ITC_DIM]),
        ("text_projection.weight", vec![ITC_DIM, h]),
        ("text_projection.bias", vec![ITC_DIM]),
        ("itm_head.weight", vec![2, h]),
        ("itm_head.bias", vec![2]),
        ("cls.predictions.transform.dense.weight", vec![h, h]),
        ("cls.predictions.transform.dense.bias", vec![h]),
        ("cls.predictions.transform.LayerNorm.weight", vec![h]),
        ("cls.predictions.transform.LayerNorm.bias", vec![h]),
        ("cls.predictions.bias", vec![VOCAB]),
    ] {
        shapes.push((k.to_string(), s));
    }
    let vars: Vec<(String, Var)> = shapes
        .into_iter()
        .map(|(k, s)| {
            let norm = k.contains("LayerNorm") || k.contains("layernorm");
            let t = if norm && k.ends_with(".weight") {
                Tensor::ones(s, DType::F32, &dev)?
            } else if norm || (k.ends_with(".bias") && s.len() == 1) {
                Tensor::zeros(s, DType::F32, &dev)?
            } else {
                Tensor::randn(0f32, 0.02, s, &dev)?
            };
            Ok((k, Var::from_tensor(&t)?))
        })
        .collect::<anyhow::Result<_>>()?;
    let tensors: HashMap<String, Tensor> = vars
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &dev);
    let model = QFormerHeads::load(vb, &cfg, queries, ITC_DIM)?;
    let temp = Var::new(0.07f32, &dev)?;
    let image = Tensor::randn(0f32, 1., (batch, patches, encoder), &dev)?;
    let mut rng = clasp::rng::Rng(7);
    let ids: Vec<u32> = (0..batch * text)
        .map(|k| {
            if k % text == 0 {
                101
            } else {
                1000 + rng.below(29000) as u32
            }
        })
        .collect();
    let ids = Tensor::from_vec(ids, (batch, text), &dev)?;
    let mask = Tensor::ones((batch, text), DType::F32, &dev)?;
    let image_ids: Vec<usize> = (0..batch).collect();
    let _graph = clasp::model::grad_mode_guard(true);
    let mut step_s = Vec::new();
    let mut losses = Vec::new();
    for _ in 0..iters {
        let t0 = Instant::now();
        let mut draw = draw_with(&mut rng);
        let s = itc_itm(
            &model,
            &image,
            &image_ids,
            &ids,
            &mask,
            temp.as_tensor(),
            &mut draw,
        )?;
        let (itg, _) = model.itg_loss(&image, &ids, &mask, (VOCAB - 1) as u32)?;
        let total = ((&s.itc + &s.itm)? + &itg)?;
        let grads = total.backward()?;
        drop(grads);
        step_s.push(t0.elapsed().as_secs_f64());
        losses = vec![
            s.itc.to_scalar::<f32>()?,
            s.itm.to_scalar::<f32>()?,
            itg.to_scalar::<f32>()?,
        ];
    }
    drop(_graph);
    let _no_graph = clasp::model::grad_mode_guard(false);
    let mut itm_ms = serde_json::Map::new();
    for k in ks {
        let feats = Tensor::randn(0f32, 1., (k, patches, encoder), &dev)?;
        let ids1 = ids.narrow(0, 0, 1)?.broadcast_as((k, text))?.contiguous()?;
        let mask1 = Tensor::ones((k, text), DType::F32, &dev)?;
        let t0 = Instant::now();
        drop(model.itm(&feats, &ids1, &mask1)?.to_vec2::<f32>()?);
        itm_ms.insert(
            k.to_string(),
            serde_json::json!(1000.0 * t0.elapsed().as_secs_f64()),
        );
    }
    // This process's own peak (the parent's getrusage of its children
    // counts the forked Python's pages before exec).
    let peak_rss_mb = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0);
    println!(
        "{}",
        serde_json::json!({"step_s": step_s, "losses": losses, "itm_ms": itm_ms,
                           "peak_rss_mb": peak_rss_mb})
    );
    Ok(())
}
