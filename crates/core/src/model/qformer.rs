//! BLIP-2's Querying Transformer (transformers' `Blip2QFormerModel`): a BERT
//! whose learned query tokens read an image through cross-attention.
//!
//! - Every layer: BERT self-attention (post-LN) over the whole sequence:
//!   the queries, then any text tokens (the ITM input is both).
//! - Every `cross_attention_frequency`-th layer (0, 2, 4, ... at 2): the
//!   queries alone cross-attend to the image features (width
//!   `encoder_hidden_size`, the vision tower's).
//! - Feed-forward: the queries through `intermediate_query`/`output_query`,
//!   text tokens through `intermediate`/`output` (present only when
//!   `use_qformer_text_input`, as in the ITM/ITC checkpoints).
//! - Its `layernorm` normalises the input embeddings (queries and text alike:
//!   BERT's embedding LayerNorm).
//!
//! The retrieval heads (`Blip2ForImageTextRetrieval`) are [`QFormerHeads`]:
//! the text embeddings (word + learned positions), the ITC projections and
//! the ITM head.
//!
//! Built from plain candle ops and [`super::layers`], so the same code
//! computes inference and, in grad mode, the gradients of training.

use candle_core::{DType, Tensor, D};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::config::Activation;
use super::layers::{activate, LayerNorm, Linear};
use super::vit::l2_normalize;
use crate::{Error, Result};

fn d_vocab() -> usize {
    30522
}
fn d_hidden() -> usize {
    768
}
fn d_layers() -> usize {
    12
}
fn d_intermediate() -> usize {
    3072
}
fn d_act() -> Activation {
    Activation::Gelu
}
fn d_eps() -> f64 {
    1e-12
}
fn d_positions() -> usize {
    512
}
fn d_two() -> usize {
    2
}
fn d_encoder() -> usize {
    1408
}

/// transformers' `Blip2QFormerConfig` (its defaults are `blip2-opt-2.7b`'s).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QFormerConfig {
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_layers")]
    pub num_attention_heads: usize,
    #[serde(default = "d_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "d_act")]
    pub hidden_act: Activation,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_positions")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default = "d_two")]
    pub cross_attention_frequency: usize,
    #[serde(default = "d_encoder")]
    pub encoder_hidden_size: usize,
    #[serde(default)]
    pub use_qformer_text_input: bool,
}

impl QFormerConfig {
    /// Every parameter of a `Blip2QFormerModel` with this config, by its
    /// name under `qformer.`, with its shape.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, e) = (
            self.hidden_size,
            self.intermediate_size,
            self.encoder_hidden_size,
        );
        let mut out: Vec<(String, Vec<usize>)> = Vec::new();
        let mut add = |name: String, shape: Vec<usize>| out.push((name, shape));
        let linear = |add: &mut dyn FnMut(String, Vec<usize>), p: String, o: usize, i: usize| {
            add(format!("{p}.weight"), vec![o, i]);
            add(format!("{p}.bias"), vec![o]);
        };
        let norm = |add: &mut dyn FnMut(String, Vec<usize>), p: String| {
            add(format!("{p}.weight"), vec![h]);
            add(format!("{p}.bias"), vec![h]);
        };
        norm(&mut add, "layernorm".into());
        for l in 0..self.num_hidden_layers {
            let p = format!("encoder.layer.{l}");
            let mut blocks = vec![("attention", h)];
            if l % self.cross_attention_frequency.max(1) == 0 {
                blocks.push(("crossattention", e));
            }
            for (b, kv) in blocks {
                linear(&mut add, format!("{p}.{b}.attention.query"), h, h);
                linear(&mut add, format!("{p}.{b}.attention.key"), h, kv);
                linear(&mut add, format!("{p}.{b}.attention.value"), h, kv);
                linear(&mut add, format!("{p}.{b}.output.dense"), h, h);
                norm(&mut add, format!("{p}.{b}.output.LayerNorm"));
            }
            let mut ffns = vec![("intermediate_query", "output_query")];
            if self.use_qformer_text_input {
                ffns.push(("intermediate", "output"));
            }
            for (up, down) in ffns {
                linear(&mut add, format!("{p}.{up}.dense"), i, h);
                linear(&mut add, format!("{p}.{down}.dense"), h, i);
                norm(&mut add, format!("{p}.{down}.LayerNorm"));
            }
        }
        out
    }

    /// Refuses a config whose sizes cannot build the model.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Report(format!("Q-Former config: {m}")));
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return bad(format!(
                "{} heads do not divide the hidden size {}",
                self.num_attention_heads, self.hidden_size
            ));
        }
        if self.cross_attention_frequency == 0 {
            return bad("cross_attention_frequency is 0".into());
        }
        Ok(())
    }
}

/// BERT's attention block: multi-head attention, then `output.dense` and a
/// post-LN residual. Keys and values come from the block's own input or, in
/// a cross-attention block, from the image features.
#[derive(Debug, Clone)]
struct AttentionBlock {
    query: Linear,
    key: Linear,
    value: Linear,
    dense: Linear,
    norm: LayerNorm,
    heads: usize,
}

impl AttentionBlock {
    fn load(vb: VarBuilder, cfg: &QFormerConfig, kv_dim: usize) -> Result<Self> {
        let h = cfg.hidden_size;
        let a = vb.pp("attention");
        Ok(Self {
            query: Linear::load(a.pp("query"), h, h, true)?,
            key: Linear::load(a.pp("key"), kv_dim, h, true)?,
            value: Linear::load(a.pp("value"), kv_dim, h, true)?,
            dense: Linear::load(vb.pp("output.dense"), h, h, true)?,
            norm: LayerNorm::load(vb.pp("output.LayerNorm"), h, cfg.layer_norm_eps)?,
            heads: cfg.num_attention_heads,
        })
    }

    /// `x` [B, T, H] attends to `kv` [B, S, *] (x itself when `None`), with
    /// an additive key mask [B, 1, 1, S] when given.
    fn forward(&self, x: &Tensor, kv: Option<&Tensor>, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let kv = kv.unwrap_or(x);
        let s = kv.dim(1)?;
        let d = h / self.heads;
        let split = |y: Tensor, len: usize| -> Result<Tensor> {
            Ok(y.reshape((b, len, self.heads, d))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = split(self.query.forward(x)?, t)?;
        let k = split(self.key.forward(kv)?, s)?;
        let v = split(self.value.forward(kv)?, s)?;
        let mut scores = (q.matmul(&k.t()?)? * (d as f64).powf(-0.5))?;
        if let Some(m) = mask {
            scores = scores.broadcast_add(m)?;
        }
        // The composed softmax: candle's fused one has no backward.
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h))?;
        let y = (self.dense.forward(&ctx)? + x)?;
        self.norm.forward(&y)
    }
}

/// BERT's feed-forward: `intermediate.dense`, the activation, then
/// `output.dense` and a post-LN residual.
#[derive(Debug, Clone)]
struct FeedForward {
    up: Linear,
    down: Linear,
    norm: LayerNorm,
    act: Activation,
}

impl FeedForward {
    fn load(vb: &VarBuilder, up: &str, down: &str, cfg: &QFormerConfig) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            up: Linear::load(vb.pp(up).pp("dense"), h, i, true)?,
            down: Linear::load(vb.pp(down).pp("dense"), i, h, true)?,
            norm: LayerNorm::load(vb.pp(down).pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            act: cfg.hidden_act,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self
            .down
            .forward(&activate(&self.up.forward(x)?, self.act)?)?;
        self.norm.forward(&(y + x)?)
    }
}

#[derive(Debug, Clone)]
struct QFormerLayer {
    attention: AttentionBlock,
    cross: Option<AttentionBlock>,
    text_ffn: Option<FeedForward>,
    query_ffn: FeedForward,
}

/// The Q-Former (`qformer.*` in a BLIP-2 checkpoint).
#[derive(Debug, Clone)]
pub struct QFormer {
    layernorm: LayerNorm,
    layers: Vec<QFormerLayer>,
    cfg: QFormerConfig,
}

/// A 0/1 key mask [B, S] as the additive mask [B, 1, 1, S] transformers
/// builds (0 where kept, the dtype's lowest value where masked).
pub fn additive_mask(mask: &Tensor) -> Result<Tensor> {
    let (b, s) = mask.dims2()?;
    let m = mask.to_dtype(DType::F32)?;
    Ok(((1.0 - m)? * f32::MIN as f64)?.reshape((b, 1, 1, s))?)
}

impl QFormer {
    /// `vb` points at `qformer`.
    pub fn load(vb: VarBuilder, cfg: &QFormerConfig) -> Result<Self> {
        cfg.validate()?;
        let enc = vb.pp("encoder.layer");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = enc.pp(i);
                Ok(QFormerLayer {
                    attention: AttentionBlock::load(l.pp("attention"), cfg, cfg.hidden_size)?,
                    cross: if i % cfg.cross_attention_frequency == 0 {
                        Some(AttentionBlock::load(
                            l.pp("crossattention"),
                            cfg,
                            cfg.encoder_hidden_size,
                        )?)
                    } else {
                        None
                    },
                    text_ffn: if cfg.use_qformer_text_input {
                        Some(FeedForward::load(&l, "intermediate", "output", cfg)?)
                    } else {
                        None
                    },
                    query_ffn: FeedForward::load(&l, "intermediate_query", "output_query", cfg)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            layernorm: LayerNorm::load(vb.pp("layernorm"), cfg.hidden_size, cfg.layer_norm_eps)?,
            layers,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &QFormerConfig {
        &self.cfg
    }

    /// `Blip2QFormerModel.forward`: `embeds` [B, T, H] are the first
    /// `query_len` query tokens followed by any text embeddings; `mask` a 0/1
    /// [B, T] key mask over them (`None`: all kept); `image` [B, P, E] the
    /// image features the queries cross-attend to (needed when
    /// `query_len > 0`). Returns the last hidden state [B, T, H].
    pub fn forward(
        &self,
        embeds: &Tensor,
        query_len: usize,
        mask: Option<&Tensor>,
        image: Option<&Tensor>,
    ) -> Result<Tensor> {
        let mask = mask.map(additive_mask).transpose()?;
        self.forward_additive(embeds, query_len, mask.as_ref(), image)
    }

    /// [`Self::forward`] with the self-attention's additive mask given
    /// whole: [B, 1, 1, T] (keys only) or [B, 1, T, T] (per query: BLIP-2's
    /// captioning mask, where queries see queries and text sees the queries
    /// and earlier text).
    pub fn forward_additive(
        &self,
        embeds: &Tensor,
        query_len: usize,
        mask: Option<&Tensor>,
        image: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, t, h) = embeds.dims3()?;
        if h != self.cfg.hidden_size || query_len > t {
            return Err(Error::Shape(format!(
                "the Q-Former takes [B, T, {}] embeddings with at most T query tokens, got {:?} with {query_len} queries",
                self.cfg.hidden_size,
                embeds.dims()
            )));
        }
        if query_len > 0 {
            match image {
                Some(img) if img.dim(0)? == b && img.dim(2)? == self.cfg.encoder_hidden_size => {}
                Some(img) => {
                    return Err(Error::Shape(format!(
                        "the Q-Former's queries read [{b}, P, {}] image features (its encoder_hidden_size), got {:?}: does the vision tower match the Q-Former?",
                        self.cfg.encoder_hidden_size,
                        img.dims()
                    )))
                }
                None => {
                    return Err(Error::Report(
                        "the Q-Former's queries need image features".into(),
                    ))
                }
            }
        }
        let text_len = t - query_len;
        if text_len > 0 && !self.cfg.use_qformer_text_input {
            return Err(Error::Report(
                "this Q-Former has no text feed-forward (use_qformer_text_input is false): it reads queries only".into(),
            ));
        }
        let mut x = self.layernorm.forward(embeds)?;
        for layer in &self.layers {
            let a = layer.attention.forward(&x, None, mask)?;
            let mut parts = Vec::with_capacity(2);
            if query_len > 0 {
                let mut q = a.narrow(1, 0, query_len)?;
                if let Some(cross) = &layer.cross {
                    q = cross.forward(&q, image, None)?;
                }
                parts.push(layer.query_ffn.forward(&q)?);
            }
            if text_len > 0 {
                let ffn = layer.text_ffn.as_ref().expect("checked above");
                parts.push(ffn.forward(&a.narrow(1, query_len, text_len)?)?);
            }
            x = if parts.len() == 1 {
                parts.pop().expect("one part")
            } else {
                Tensor::cat(&parts, 1)?
            };
        }
        Ok(x)
    }

    /// The query tokens' outputs [B, N, H] for image features [B, P, E]:
    /// what `Blip2ForConditionalGeneration` projects into the language model
    /// and the ITC image side reads.
    pub fn queries(&self, query_tokens: &Tensor, image: &Tensor) -> Result<Tensor> {
        let b = image.dim(0)?;
        let (_, n, h) = query_tokens.dims3()?;
        let q = query_tokens.broadcast_as((b, n, h))?.contiguous()?;
        self.forward(&q, n, None, Some(image))
    }
}

#[path = "qformer_heads.rs"]
mod heads;
pub use heads::{ItgHead, QFormerHeads};

#[cfg(test)]
mod tests {
    use super::*;

    /// `param_shapes` names exactly what `QFormer::load` reads.
    #[test]
    fn param_shapes_are_what_load_reads() {
        for text in [false, true] {
            let cfg: QFormerConfig = serde_json::from_value(serde_json::json!({
                "hidden_size": 8, "num_hidden_layers": 3, "num_attention_heads": 2,
                "intermediate_size": 16, "encoder_hidden_size": 12,
                "cross_attention_frequency": 2, "use_qformer_text_input": text,
            }))
            .unwrap();
            let dev = candle_core::Device::Cpu;
            let tensors: std::collections::HashMap<String, Tensor> = cfg
                .param_shapes()
                .into_iter()
                .map(|(k, s)| (k, Tensor::zeros(s, DType::F32, &dev).unwrap()))
                .collect();
            let n = tensors.len();
            // 3 layers, cross-attention in 2 of them: 1 norm, 3 self + 2
            // cross blocks of 10 tensors, 3 or 6 feed-forwards of 6.
            assert_eq!(n, 2 + 5 * 10 + if text { 36 } else { 18 });
            let vb = VarBuilder::from_tensors(tensors, DType::F32, &dev);
            QFormer::load(vb, &cfg).unwrap();
        }
    }
}
