//! The llama architecture (Llama 2/3, SmolLM, Mistral-style dense decoders):
//! RMSNorm, rotary positions, grouped-query attention with a KV cache, and a
//! SiLU-gated MLP.
//!
//! One model type serves both formats. From GGUF the projections stay
//! quantized (`QMatMul` over the file's blocks) or are dequantized to f32;
//! from a Hugging Face `LlamaForCausalLM` checkpoint they are f32 tensors.
//! GGUF files store q and k with their rows interleaved for llama.cpp's
//! rotary layout, Hugging Face checkpoints in rotate-half layout, so the
//! rotary step follows the source (`RopeLayout`).
//!
//! Batches are left-padded: each row of the cache knows how many of its first
//! positions are padding; those keys are masked and the row's positions start
//! at its first real token, as transformers computes them from the attention
//! mask.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Tensor};
use candle_nn::kv_cache::KvCache;
use candle_nn::VarBuilder;

pub use super::config::{LlamaConfig, RopeLayout};
use super::gguf::GgufFile;
use super::linear::{check_shape, linear, Group, Linear};
use super::lora::{Lora, LoraConfig, LoraPair, Proj};
pub use super::ops::interleaved_to_half_rows;
use super::ops::{rope_tables, Ops};
use super::quant::{Kernel, Q8_0Matrix};
use crate::{Error, Result};
use clasp_kernels::grad_kernels as gk;

#[path = "llama/cache.rs"]
mod cache;
pub use cache::*;
#[path = "llama/adapter.rs"]
mod adapter;
#[path = "llama/hf.rs"]
mod hf;
#[path = "llama/training.rs"]
mod training;

/// How the projection weights are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// As stored in the GGUF (Q4_1, Q8_0, ...): small and fast.
    #[default]
    Quantized,
    /// Dequantized to f32: exact against transformers, and differentiable.
    F32,
}

#[derive(Debug, Clone)]
struct Block {
    attn_norm: Tensor,
    /// q, k, v.
    qkv: Group,
    o: Linear,
    ffn_norm: Tensor,
    /// gate, up.
    gate_up: Group,
    down: Linear,
    /// LoRA adapters of this layer's projections, in `lora::TARGETS` order.
    lora: [Option<LoraPair>; 7],
}

/// Token embeddings: quantized rows looked up one by one, or an f32 table.
#[derive(Debug, Clone)]
enum Embedding {
    Quantized(Arc<QTensor>),
    Q8_0(Arc<Q8_0Matrix>),
    F32(Tensor),
}

#[derive(Debug, Clone)]
pub struct Llama {
    cfg: LlamaConfig,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Linear,
    cos: Tensor,
    sin: Tensor,
    device: Device,
    /// The LoRA adapter held in the blocks (unmerged), if any.
    lora: Option<LoraConfig>,
}

fn load_embedding(
    g: &mut GgufFile,
    cfg: &LlamaConfig,
    precision: Precision,
    device: &Device,
) -> Result<Embedding> {
    let name = "token_embd.weight";
    let shape = [cfg.vocab_size, cfg.hidden_size];
    if precision == Precision::Quantized
        && device.is_cpu()
        && g.tensor_type(name) == Some(GgmlDType::Q8_0)
    {
        let (_, dims, bytes) = g.raw(name)?;
        check_shape(g, name, &dims, &shape)?;
        let m = Q8_0Matrix::from_ggml(&bytes, shape[0], shape[1])
            .map_err(|e| g.error(format!("tensor `{name}`: {e}")))?;
        return Ok(Embedding::Q8_0(Arc::new(m)));
    }
    let t = g.tensor(name, device)?;
    check_shape(g, name, t.shape().dims(), &shape)?;
    Ok(match precision {
        Precision::F32 => Embedding::F32(t.dequantize(device)?),
        Precision::Quantized => Embedding::Quantized(Arc::new(t)),
    })
}

impl Llama {
    /// Builds the model from an open GGUF file.
    /// `cfg` is `LlamaConfig::from_gguf` of the same file, read before (the
    /// metadata may have been dropped since, see `GgufFile::forget_metadata`).
    pub fn from_gguf(
        g: &mut GgufFile,
        cfg: LlamaConfig,
        precision: Precision,
        device: &Device,
    ) -> Result<Self> {
        let dense = |g: &mut GgufFile, name: &str| -> Result<Tensor> {
            Ok(g.tensor(name, device)?.dequantize(device)?)
        };
        let embed = load_embedding(g, &cfg, precision, device)?;
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        let kv = cfg.num_kv_heads * cfg.head_dim;
        let qd = cfg.num_heads * cfg.head_dim;
        for i in 0..cfg.num_layers {
            let mut lin = |name: &str, rows: usize, cols: usize| -> Result<Linear> {
                linear(
                    g,
                    &format!("blk.{i}.{name}.weight"),
                    &[rows, cols],
                    precision,
                    device,
                )
            };
            let q = lin("attn_q", qd, cfg.hidden_size)?;
            let k = lin("attn_k", kv, cfg.hidden_size)?;
            let v = lin("attn_v", kv, cfg.hidden_size)?;
            let o = lin("attn_output", cfg.hidden_size, qd)?;
            let gate = lin("ffn_gate", cfg.intermediate_size, cfg.hidden_size)?;
            let up = lin("ffn_up", cfg.intermediate_size, cfg.hidden_size)?;
            let down = lin("ffn_down", cfg.hidden_size, cfg.intermediate_size)?;
            blocks.push(Block {
                attn_norm: dense(g, &format!("blk.{i}.attn_norm.weight"))?,
                qkv: Group::new(vec![q, k, v]),
                o,
                ffn_norm: dense(g, &format!("blk.{i}.ffn_norm.weight"))?,
                gate_up: Group::new(vec![gate, up]),
                down,
                lora: Default::default(),
            });
        }
        let norm = dense(g, "output_norm.weight")?;
        let lm_head = match (&embed, cfg.tie_word_embeddings) {
            (Embedding::F32(w), true) => Linear::Candle(QMatMul::Tensor(w.clone())),
            (Embedding::Q8_0(w), true) => Linear::Q8_0(w.clone(), Kernel::detect()),
            (Embedding::Quantized(q), true) => Linear::Candle(QMatMul::from_arc(q.clone())?),
            (_, false) => {
                let shape = [cfg.vocab_size, cfg.hidden_size];
                linear(g, "output.weight", &shape, precision, device)?
            }
        };
        Self::assemble(cfg, embed, blocks, norm, lm_head, device)
    }

    /// Builds the model from a `LlamaForCausalLM` safetensors checkpoint.
    pub fn from_hf(vb: VarBuilder, cfg: LlamaConfig) -> Result<Self> {
        let device = vb.device().clone();
        let m = vb.pp("model");
        let kv = cfg.num_kv_heads * cfg.head_dim;
        let qd = cfg.num_heads * cfg.head_dim;
        let h = cfg.hidden_size;
        let lin = |vb: VarBuilder, rows: usize, cols: usize| -> Result<Linear> {
            Ok(Linear::Candle(QMatMul::Tensor(
                vb.get((rows, cols), "weight")?,
            )))
        };
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let l = m.pp(format!("layers.{i}"));
            let a = l.pp("self_attn");
            let f = l.pp("mlp");
            blocks.push(Block {
                attn_norm: l.pp("input_layernorm").get(h, "weight")?,
                qkv: Group::Split(vec![
                    lin(a.pp("q_proj"), qd, h)?,
                    lin(a.pp("k_proj"), kv, h)?,
                    lin(a.pp("v_proj"), kv, h)?,
                ]),
                o: lin(a.pp("o_proj"), h, qd)?,
                ffn_norm: l.pp("post_attention_layernorm").get(h, "weight")?,
                gate_up: Group::Split(vec![
                    lin(f.pp("gate_proj"), cfg.intermediate_size, h)?,
                    lin(f.pp("up_proj"), cfg.intermediate_size, h)?,
                ]),
                down: lin(f.pp("down_proj"), h, cfg.intermediate_size)?,
                lora: Default::default(),
            });
        }
        let embed = m.pp("embed_tokens").get((cfg.vocab_size, h), "weight")?;
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            vb.pp("lm_head").get((cfg.vocab_size, h), "weight")?
        };
        let norm = m.pp("norm").get(h, "weight")?;
        Self::assemble(
            cfg,
            Embedding::F32(embed),
            blocks,
            norm,
            Linear::Candle(QMatMul::Tensor(lm_head)),
            &device,
        )
    }

    fn assemble(
        cfg: LlamaConfig,
        embed: Embedding,
        blocks: Vec<Block>,
        norm: Tensor,
        lm_head: Linear,
        device: &Device,
    ) -> Result<Self> {
        let (cos, sin) = rope_tables(&cfg, device)?;
        Ok(Self {
            cfg,
            embed,
            blocks,
            norm,
            lm_head,
            cos,
            sin,
            device: device.clone(),
            lora: None,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A fresh cache for `pad.len()` rows, with `pad[i]` padding positions at
    /// the start of row i.
    pub fn new_cache(&self, pad: Vec<usize>) -> Cache {
        Cache {
            layers: (0..self.cfg.num_layers)
                .map(|_| KvCache::new(2, 64))
                .collect(),
            pad,
            len: 0,
        }
    }

    /// Token embeddings, `[b, t]` ids to `[b, t, hidden]`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(match &self.embed {
            Embedding::Quantized(q) => q.embedding(ids)?,
            Embedding::Q8_0(w) => {
                let (b, t) = ids.dims2()?;
                let mut rows = Vec::with_capacity(b * t * self.cfg.hidden_size);
                for id in ids.flatten_all()?.to_vec1::<u32>()? {
                    if id as usize >= w.rows() {
                        return Err(Error::Generate(format!(
                            "token id {id} is outside the vocabulary of {}",
                            w.rows()
                        )));
                    }
                    rows.extend(w.dequantize_row(id as usize));
                }
                Tensor::from_vec(rows, (b, t, self.cfg.hidden_size), &self.device)?
            }
            Embedding::F32(w) => {
                let (b, t) = ids.dims2()?;
                w.index_select(&ids.flatten_all()?, 0)?
                    .reshape((b, t, self.cfg.hidden_size))?
            }
        })
    }

    /// Runs `x` (`[b, t, hidden]` input embeddings) through the decoder,
    /// appending to the cache, and returns the final normed hidden states.
    pub fn forward_embeds(&self, x: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        if b != cache.batch_size() {
            return Err(Error::Shape(format!(
                "batch of {b} rows against a cache of {}",
                cache.batch_size()
            )));
        }
        let start = cache.len;
        let total = start + t;
        if total > self.cfg.max_position_embeddings {
            return Err(Error::Generate(format!(
                "{total} positions exceed the model's context of {}",
                self.cfg.max_position_embeddings
            )));
        }
        let padded = cache.pad.iter().any(|&p| p > 0);
        let (cos, sin) = self.rope_for(cache, start, t)?;
        let mask = if padded || t > 1 {
            Some(self.mask(cache, start, t)?)
        } else {
            None
        };
        // The layers run on a rayon worker thread: a parallel loop started
        // from outside the pool hands its work over and sleeps on a latch
        // (a futex wake and wait each way), and a decode step starts about
        // 200 of them; inside the pool they are cheap work-stealing joins.
        let layers = &mut cache.layers;
        let (x, ()) = rayon::join(
            || -> Result<Tensor> {
                let mut x = x.clone();
                for (block, kv) in self.blocks.iter().zip(layers.iter_mut()) {
                    x = self.block(block, &x, Some(kv), &cos, &sin, mask.as_ref(), Ops::Fused)?;
                }
                Ok(candle_nn::ops::rms_norm(
                    &x,
                    &self.norm,
                    self.cfg.rms_norm_eps as f32,
                )?)
            },
            || (),
        );
        cache.len = total;
        x
    }

    /// Logits `[b, t, vocab]` from final hidden states.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)
    }

    /// Input embeddings `[b, t, hidden]` to the logits of the last
    /// position, `[b, vocab]`.
    pub fn last_logits(&self, x: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let h = self.forward_embeds(x, cache)?;
        let t = h.dim(1)?;
        Ok(self.logits(&h.narrow(1, t - 1, 1)?)?.squeeze(1)?)
    }

    /// Ids to the logits of the last position, `[b, vocab]`.
    pub fn forward_last(&self, ids: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        self.last_logits(&self.embed(ids)?, cache)
    }

    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        b: &Block,
        x: &Tensor,
        kv: Option<&mut KvCache>,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        ops: Ops,
    ) -> Result<Tensor> {
        let eps = self.cfg.rms_norm_eps as f32;
        let h = ops.rms_norm(x, &b.attn_norm, eps)?;
        let x = (x + self.attention(b, &h, kv, cos, sin, mask, ops)?)?;
        let h = ops.rms_norm(&x, &b.ffn_norm, eps)?;
        let mut gu = ops.group(&b.gate_up, &h)?;
        self.adapt(b, Proj::Gate, &h, &mut gu)?;
        let inner = ops.swiglu(&gu[0], &gu[1])?;
        let mut mlp = vec![ops.linear(&b.down, &inner)?];
        self.adapt(b, Proj::Down, &inner, &mut mlp)?;
        Ok((x + &mlp[0])?)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        blk: &Block,
        x: &Tensor,
        kv: Option<&mut KvCache>,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        ops: Ops,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let (b, t, _) = x.dims3()?;
        let hd = c.head_dim;
        let mut qkv = ops.group(&blk.qkv, x)?;
        self.adapt(blk, Proj::Q, x, &mut qkv)?;
        if ops == Ops::Autograd && kv.is_none() && gk::applies(x) {
            return self.attention_train(blk, &qkv, cos, sin);
        }
        let heads = |y: &Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let q = heads(&qkv[0], c.num_heads)?;
        let k = heads(&qkv[1], c.num_kv_heads)?;
        let v = heads(&qkv[2], c.num_kv_heads)?;
        let (q, k) = (
            ops.rope(c.rope_layout, &q, cos, sin)?,
            ops.rope(c.rope_layout, &k, cos, sin)?,
        );
        let (k, v) = match kv {
            Some(kv) => kv.append(&k, &v)?,
            None => (k, v),
        };
        let total = k.dim(2)?;
        // Grouped queries without copying keys: the n_rep query heads that
        // share a key head are stacked along the sequence axis.
        let n_rep = c.num_heads / c.num_kv_heads;
        let q = q.reshape((b, c.num_kv_heads, n_rep * t, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let att = (q.matmul(&k.t()?)? * scale)?;
        let att = match mask {
            Some(m) => att
                .reshape((b, c.num_kv_heads, n_rep, t, total))?
                .broadcast_add(m)?
                .reshape((b, c.num_kv_heads, n_rep * t, total))?,
            None => att,
        };
        let att = ops.softmax(&att)?;
        let y = att.matmul(&v.contiguous()?)?;
        let y = y
            .reshape((b, c.num_heads, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, c.num_heads * hd))?;
        self.out_proj(blk, &y, ops)
    }

    /// The attention's output projection, with its LoRA delta.
    fn out_proj(&self, blk: &Block, y: &Tensor, ops: Ops) -> Result<Tensor> {
        let mut o = vec![ops.linear(&blk.o, y)?];
        self.adapt(blk, Proj::O, y, &mut o)?;
        Ok(o.swap_remove(0))
    }

    /// cos/sin for positions start..start+t of each row: `[t, d/2]` when no
    /// row is padded, else `[b, t, d/2]` with each row's own positions.
    fn rope_for(&self, cache: &Cache, start: usize, t: usize) -> Result<(Tensor, Tensor)> {
        if cache.pad.iter().all(|&p| p == 0) {
            return Ok((self.cos.narrow(0, start, t)?, self.sin.narrow(0, start, t)?));
        }
        let b = cache.pad.len();
        let mut pos = Vec::with_capacity(b * t);
        for &p in &cache.pad {
            for i in start..start + t {
                // Padding rows get position 1, as transformers fills them.
                pos.push(if i >= p { (i - p) as u32 } else { 1 });
            }
        }
        let idx = Tensor::from_vec(pos, b * t, &self.device)?;
        let half = self.cfg.head_dim / 2;
        Ok((
            self.cos.index_select(&idx, 0)?.reshape((b, t, half))?,
            self.sin.index_select(&idx, 0)?.reshape((b, t, half))?,
        ))
    }

    /// Additive mask `[b, 1, 1, t, total]`: causal, and padding keys hidden.
    /// A large finite negative rather than -inf, so that a padding query row
    /// (all keys hidden) softmaxes to a uniform row instead of NaN.
    fn mask(&self, cache: &Cache, start: usize, t: usize) -> Result<Tensor> {
        let total = start + t;
        let b = cache.pad.len();
        let mut m = vec![0f32; b * t * total];
        for (r, &p) in cache.pad.iter().enumerate() {
            for i in 0..t {
                let qpos = start + i;
                for j in 0..total {
                    if j > qpos || j < p {
                        m[(r * t + i) * total + j] = -1e30;
                    }
                }
            }
        }
        Ok(Tensor::from_vec(m, (b, 1, 1, t, total), &self.device)?)
    }
}

#[cfg(test)]
#[path = "llama_tests.rs"]
mod tests;
