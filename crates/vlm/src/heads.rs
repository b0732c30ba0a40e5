//! BCIF's contrastive heads on a vision-language model: the image side is
//! the mean of the connector's tokens through a linear head, the text side
//! the mean of the language model's last hidden states over a caption (in a
//! text-only pass) through another; both L2-normalised. Training
//! (`train::bcif`) learns them; evaluation measures their retrieval.

use std::path::Path;

use candle_core::{Device, Tensor, D};

use super::Vlm;
use crate::{Error, Result};

/// The file beside a checkpoint that holds the heads (and the temperature).
pub const HEADS: &str = "contrastive_heads.safetensors";

/// The trained heads of a checkpoint (`contrastive_heads.safetensors`
/// beside it), for measuring the branch's retrieval.
pub struct Heads {
    pub image: Tensor,
    pub text: Tensor,
}

impl Heads {
    /// The heads saved in `checkpoint`, if the run had a contrastive branch.
    pub fn load(checkpoint: &Path, device: &Device) -> Result<Option<Self>> {
        let p = checkpoint.join(HEADS);
        if !p.is_file() {
            return Ok(None);
        }
        let t = candle_core::safetensors::load(&p, device).map_err(|e| Error::Weights {
            path: p.clone(),
            reason: e.to_string(),
        })?;
        let get = |k: &str| {
            t.get(k).cloned().ok_or_else(|| Error::Weights {
                path: p.clone(),
                reason: format!("no {k}"),
            })
        };
        Ok(Some(Self {
            image: get("contrastive.image_head.weight")?,
            text: get("contrastive.text_head.weight")?,
        }))
    }
}

/// The image side: the mean of the connector's tokens `[B, N, hidden]`
/// through `head` `[P, hidden]`, normalised.
pub fn image_side(tokens: &Tensor, head: &Tensor) -> Result<Tensor> {
    normalize(&tokens.mean(1)?.matmul(&head.t()?)?)
}

/// The text side: each caption's tokens alone through the language model,
/// the mean of its last hidden states over them, through `head`,
/// normalised. Without `graph` the language model's pass is cut from the
/// graph (only the head learns).
pub fn text_side(vlm: &Vlm, captions: &[Vec<u32>], head: &Tensor, graph: bool) -> Result<Tensor> {
    let t = captions.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let b = captions.len();
    let pad = vlm.tokenizer.eos_id().unwrap_or(0);
    let mut ids = Vec::with_capacity(b * t);
    let mut mask = Vec::with_capacity(b * t);
    for c in captions {
        let n = c.len().max(1);
        ids.extend(c.iter().copied());
        ids.extend(std::iter::repeat_n(pad, t - c.len()));
        mask.extend((0..t).map(|i| if i < c.len() { 1.0 / n as f32 } else { 0.0 }));
    }
    let dev = vlm.device();
    let x = vlm.llm.embed(&Tensor::from_vec(ids, (b, t), dev)?)?;
    let h = {
        let _g = clasp_core::model::grad_mode_guard(graph);
        let h = vlm.llm.forward_train(&x)?;
        if graph {
            h
        } else {
            h.detach()
        }
    };
    // Right padding: a caption's positions never see the padding.
    let w = Tensor::from_vec(mask, (b, 1, t), dev)?;
    let mean = w.matmul(&h)?.squeeze(1)?;
    normalize(&mean.matmul(&head.t()?)?)
}

fn normalize(x: &Tensor) -> Result<Tensor> {
    let n = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    Ok(x.broadcast_div(&(n + 1e-12)?)?)
}
