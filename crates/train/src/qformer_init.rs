//! A fresh BLIP-2 Q-Former with its retrieval and captioning heads, started
//! from a pretrained BERT as LAVIS's `Blip2Qformer.init_Qformer` starts it
//! from `bert-base-uncased`:
//!
//! - each layer's self-attention and feed-forward from the BERT's layer, the
//!   feed-forward copied into the queries' own (`intermediate_query`,
//!   `output_query`) as LAVIS copies `*_query` from the text's;
//! - cross-attention (every `cross_attention_frequency`-th layer) fresh;
//! - the embeddings LayerNorm as the Q-Former's `layernorm`; BERT's token
//!   type 0 embedding folded into the positions (the Q-Former has no token
//!   types); one more word, `[DEC]`, the captioning decoder's first token;
//! - BERT's own initialisation for what is new (normal 0.02, LayerNorms at
//!   1 and 0, biases 0), `nn.Linear`'s for the ITC projections and the ITM
//!   head, and the queries normal 0.02.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use clasp_common::rng::Rng;
use clasp_core::model::qformer::QFormerConfig;

use crate::{Error, Result};

/// The width of the ITC embeddings (BLIP-2's `embed_dim`).
pub const ITC_DIM: usize = 256;
/// The caption length BLIP-2's stage 1 trains with (`max_txt_len`).
pub const MAX_TEXT: usize = 32;

/// The captioning decoder's first token (BLIP-2's `bos_token`).
pub const DEC: &str = "[DEC]";

/// A new Q-Former's config and tensors (names as in a
/// `Blip2ForImageTextRetrieval` checkpoint, without `vision_model.*`, plus
/// `cls.predictions.*` and `temp`), and the BERT's tokenizer with `[DEC]`
/// added (LAVIS's `init_tokenizer`).
pub struct Fresh {
    pub config: QFormerConfig,
    pub tensors: HashMap<String, Tensor>,
    pub tokenizer: tokenizers::Tokenizer,
}

/// The BERT's tokenizer.json with `[DEC]` added, and `[DEC]`'s id.
fn tokenizer_with_dec(dir: &Path) -> Result<(tokenizers::Tokenizer, u32)> {
    let tj = dir.join("tokenizer.json");
    let mut tok = tokenizers::Tokenizer::from_file(&tj).map_err(|e| Error::Tokenizer {
        path: tj.clone(),
        reason: e.to_string(),
    })?;
    tok.add_special_tokens(&[tokenizers::AddedToken::from(DEC, true)]);
    let id = tok.token_to_id(DEC).ok_or_else(|| Error::Tokenizer {
        path: tj,
        reason: format!("{DEC} could not be added"),
    })?;
    Ok((tok, id))
}

/// The BERT checkpoint's tensors by their `BertModel` names (a `bert.`
/// prefix, as `BertForMaskedLM` saves them, is dropped).
fn bert_tensors(dir: &Path) -> Result<HashMap<String, Tensor>> {
    let w = dir.join("model.safetensors");
    let t = candle_core::safetensors::load(&w, &Device::Cpu).map_err(|e| Error::Weights {
        path: w.clone(),
        reason: e.to_string(),
    })?;
    Ok(t.into_iter()
        .map(|(k, v)| (k.strip_prefix("bert.").unwrap_or(&k).to_string(), v))
        .collect())
}

/// The Q-Former config a BERT's config.json gives, over image tokens of
/// width `vision_width`.
fn config(dir: &Path, vision_width: usize, dec: u32) -> Result<QFormerConfig> {
    let p = dir.join("config.json");
    let v = clasp_core::model::loader::read_json(&p)?;
    if v["model_type"] != "bert" {
        return Err(Error::Config {
            path: p,
            reason: format!(
                "model_type {} is not bert: a Q-Former starts from a BERT (e.g. MiniLM)",
                v["model_type"]
            ),
        });
    }
    let mut q = v.clone();
    // The embeddings grow to hold [DEC] (as LAVIS's resize_token_embeddings).
    let vocab = v["vocab_size"].as_u64().unwrap_or(0).max(dec as u64 + 1);
    q["vocab_size"] = vocab.into();
    q["cross_attention_frequency"] = 2.into();
    q["encoder_hidden_size"] = vision_width.into();
    q["use_qformer_text_input"] = true.into();
    let cfg: QFormerConfig = serde_json::from_value(q).map_err(|e| Error::Config {
        path: p.clone(),
        reason: e.to_string(),
    })?;
    cfg.validate()?;
    Ok(cfg)
}

/// A Q-Former over `vision_width`-wide image tokens with `queries` queries,
/// its BERT layers from `bert_dir`, the new parts drawn from `seed`.
pub fn from_bert(bert_dir: &Path, vision_width: usize, queries: usize, seed: u64) -> Result<Fresh> {
    let (tokenizer, dec) = tokenizer_with_dec(bert_dir)?;
    let cfg = config(bert_dir, vision_width, dec)?;
    let bert = bert_tensors(bert_dir)?;
    let h = cfg.hidden_size;
    let mut rng = Rng(seed ^ 0x000B_11B2);
    let dev = &Device::Cpu;
    let get = |k: &str| -> Result<Tensor> {
        bert.get(k).cloned().ok_or_else(|| {
            Error::Report(format!(
                "{}: the BERT has no {k}",
                bert_dir.join("model.safetensors").display()
            ))
        })
    };
    let mut out: HashMap<String, Tensor> = HashMap::new();
    for (name, shape) in cfg.param_shapes() {
        let src = if let Some(rest) = name.strip_prefix("layernorm.") {
            Some(format!("embeddings.LayerNorm.{rest}"))
        } else if name.contains(".crossattention.") {
            None
        } else {
            Some(
                name.replace(".attention.attention.", ".attention.self.")
                    .replace("intermediate_query", "intermediate")
                    .replace("output_query", "output"),
            )
        };
        let t = match src {
            Some(k) => {
                let t = get(&k)?;
                if t.dims() != shape.as_slice() {
                    return Err(Error::Shape(format!(
                        "the BERT's {k} is {:?}; the Q-Former's {name} needs {shape:?}",
                        t.dims()
                    )));
                }
                t
            }
            None => bert_init(&mut rng, &name, &shape, dev)?,
        };
        out.insert(format!("qformer.{name}"), t);
    }
    let words = get("embeddings.word_embeddings.weight")?;
    let more = cfg.vocab_size - words.dim(0)?;
    let words = if more > 0 {
        let new = Tensor::from_vec(rng.normal(more * h, 0.02), (more, h), dev)?;
        Tensor::cat(&[&words, &new], 0)?
    } else {
        words
    };
    out.insert("embeddings.word_embeddings.weight".into(), words);
    let types = get("embeddings.token_type_embeddings.weight")?.narrow(0, 0, 1)?;
    out.insert(
        "embeddings.position_embeddings.weight".into(),
        get("embeddings.position_embeddings.weight")?.broadcast_add(&types)?,
    );
    out.insert(
        "query_tokens".into(),
        Tensor::from_vec(rng.normal(queries * h, 0.02), (1, queries, h), dev)?,
    );
    for (name, o) in [
        ("vision_projection", ITC_DIM),
        ("text_projection", ITC_DIM),
        ("itm_head", 2),
    ] {
        let bound = 1.0 / (h as f64).sqrt();
        out.insert(
            format!("{name}.weight"),
            Tensor::from_vec(rng.symmetric(o * h, bound), (o, h), dev)?,
        );
        out.insert(
            format!("{name}.bias"),
            Tensor::from_vec(rng.symmetric(o, bound), o, dev)?,
        );
    }
    let p = "cls.predictions";
    for (name, shape) in [
        (format!("{p}.transform.dense.weight"), vec![h, h]),
        (format!("{p}.transform.dense.bias"), vec![h]),
        (format!("{p}.transform.LayerNorm.weight"), vec![h]),
        (format!("{p}.transform.LayerNorm.bias"), vec![h]),
        (format!("{p}.bias"), vec![cfg.vocab_size]),
    ] {
        let t = bert_init(&mut rng, &name, &shape, dev)?;
        out.insert(name, t);
    }
    out.insert("temp".into(), Tensor::new(0.07f32, dev)?);
    Ok(Fresh {
        config: cfg,
        tensors: out,
        tokenizer,
    })
}

/// BERT's `_init_weights`: matrices normal(0, 0.02), LayerNorm weights 1,
/// every bias 0.
fn bert_init(rng: &mut Rng, name: &str, shape: &[usize], dev: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v = if name.ends_with("bias") {
        vec![0f32; n]
    } else if name.contains("LayerNorm") || name.starts_with("layernorm") {
        vec![1f32; n]
    } else {
        rng.normal(n, 0.02)
    };
    Ok(Tensor::from_vec(v, shape, dev)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_draws_have_the_asked_spread() {
        let mut rng = Rng(7);
        let v = rng.normal(20000, 0.02);
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 1e-3, "{mean}");
        assert!((var.sqrt() - 0.02).abs() < 5e-4, "{}", var.sqrt());
    }

    #[test]
    fn new_parts_follow_berts_initialisation() {
        let mut rng = Rng(1);
        let d = &Device::Cpu;
        let ln = bert_init(&mut rng, "x.LayerNorm.weight", &[4], d).unwrap();
        assert_eq!(ln.to_vec1::<f32>().unwrap(), vec![1.0; 4]);
        let b = bert_init(&mut rng, "x.dense.bias", &[3], d).unwrap();
        assert_eq!(b.to_vec1::<f32>().unwrap(), vec![0.0; 3]);
        let w = bert_init(&mut rng, "x.dense.weight", &[50, 50], d).unwrap();
        let v: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|x| x.abs() < 0.2) && v.iter().any(|x| x.abs() > 0.01));
    }
}
