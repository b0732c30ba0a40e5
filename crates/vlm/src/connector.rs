//! The connector between the vision tower and the language model.
//!
//! - `mlp2x_gelu` (LLaVA-1.5): Linear(vision → text), GELU, Linear(text →
//!   text), applied to every patch token; saved as transformers'
//!   `multi_modal_projector.linear_1/linear_2`.
//! - `resampler`: a Perceiver resampler. N learnable queries attend to the
//!   patch tokens through L blocks of (pre-LN cross-attention, pre-LN
//!   feed-forward), compressing any number of patches to N tokens, then a
//!   final LayerNorm and a projection to the text width. Its keys are
//!   clasp's own (`multi_modal_projector.resampler.*`).
//!
//! Both are plain candle ops on tensors held as `Var`s, so the same code
//! computes the forward pass for inference and, with a graph, the gradients
//! of training.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var, D};
use serde::{Deserialize, Serialize};

use crate::rng::Rng;
use crate::{Error, Result};

/// Which connector, and its sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ConnectorKind {
    Mlp2xGelu,
    Resampler {
        /// Learnable queries: the number of image tokens the LLM sees.
        queries: usize,
        /// Cross-attention blocks.
        layers: usize,
        /// Attention heads (must divide the vision width).
        heads: usize,
    },
}

impl ConnectorKind {
    /// Image tokens per image given `patches` patch tokens.
    pub fn tokens(&self, patches: usize) -> usize {
        match self {
            Self::Mlp2xGelu => patches,
            Self::Resampler { queries, .. } => *queries,
        }
    }
}

/// A connector's parameters, by name (the saved keys without the
/// `multi_modal_projector.` prefix).
#[derive(Clone)]
pub struct Connector {
    kind: ConnectorKind,
    vars: Vec<(String, Var)>,
    index: HashMap<String, usize>,
    vision_dim: usize,
    text_dim: usize,
}

/// The parameter names and shapes of a connector.
fn shapes(kind: ConnectorKind, v: usize, t: usize) -> Vec<(String, Vec<usize>)> {
    let mut out: Vec<(String, Vec<usize>)> = Vec::new();
    match kind {
        ConnectorKind::Mlp2xGelu => {
            out.push(("linear_1.weight".into(), vec![t, v]));
            out.push(("linear_1.bias".into(), vec![t]));
            out.push(("linear_2.weight".into(), vec![t, t]));
            out.push(("linear_2.bias".into(), vec![t]));
        }
        ConnectorKind::Resampler {
            queries, layers, ..
        } => {
            let r = "resampler";
            out.push((format!("{r}.queries"), vec![queries, v]));
            for l in 0..layers {
                let p = format!("{r}.layers.{l}");
                for n in ["norm_q", "norm_kv", "norm_ff"] {
                    out.push((format!("{p}.{n}.weight"), vec![v]));
                    out.push((format!("{p}.{n}.bias"), vec![v]));
                }
                for n in ["q_proj", "k_proj", "v_proj", "o_proj"] {
                    out.push((format!("{p}.attn.{n}.weight"), vec![v, v]));
                    out.push((format!("{p}.attn.{n}.bias"), vec![v]));
                }
                out.push((format!("{p}.ff.fc1.weight"), vec![4 * v, v]));
                out.push((format!("{p}.ff.fc1.bias"), vec![4 * v]));
                out.push((format!("{p}.ff.fc2.weight"), vec![v, 4 * v]));
                out.push((format!("{p}.ff.fc2.bias"), vec![v]));
            }
            out.push((format!("{r}.norm_out.weight"), vec![v]));
            out.push((format!("{r}.norm_out.bias"), vec![v]));
            out.push((format!("{r}.proj.weight"), vec![t, v]));
            out.push((format!("{r}.proj.bias"), vec![t]));
        }
    }
    out
}

impl Connector {
    /// A fresh connector: linear layers as torch's `nn.Linear` initialises
    /// them (uniform ±1/√fan_in, weight and bias), LayerNorms at 1 and 0,
    /// queries N(0, 0.02²)-like (uniform with the same variance), from `seed`.
    pub fn new(
        kind: ConnectorKind,
        vision_dim: usize,
        text_dim: usize,
        seed: u64,
        dev: &Device,
    ) -> Result<Self> {
        if let ConnectorKind::Resampler { heads, queries, .. } = kind {
            if heads == 0 || !vision_dim.is_multiple_of(heads) || queries == 0 {
                return Err(Error::Report(format!(
                    "resampler: {heads} heads do not divide the vision width {vision_dim} (or no queries)"
                )));
            }
        }
        let mut rng = Rng(seed ^ 0xC0_77EC);
        let specs = shapes(kind, vision_dim, text_dim);
        let mut tensors = HashMap::new();
        for (i, (name, shape)) in specs.iter().enumerate() {
            let n: usize = shape.iter().product();
            let v = if name.ends_with("norm_q.weight")
                || name.ends_with("norm_kv.weight")
                || name.ends_with("norm_ff.weight")
                || name.ends_with("norm_out.weight")
            {
                vec![1f32; n]
            } else if name.contains(".norm_") {
                vec![0f32; n]
            } else if name.ends_with("queries") {
                rng.symmetric(n, 0.02 * 3f64.sqrt())
            } else {
                // A bias takes its weight's fan-in (the weight comes first).
                let fan_in = if name.ends_with(".bias") {
                    specs[i - 1].1[1]
                } else {
                    shape[1]
                };
                rng.symmetric(n, 1.0 / (fan_in as f64).sqrt())
            };
            tensors.insert(name.clone(), Tensor::from_vec(v, shape.clone(), dev)?);
        }
        Self::from_tensors(kind, vision_dim, text_dim, &tensors)
    }

    /// A connector from named tensors (keys without `multi_modal_projector.`),
    /// checking every name and shape.
    pub fn from_tensors(
        kind: ConnectorKind,
        vision_dim: usize,
        text_dim: usize,
        tensors: &HashMap<String, Tensor>,
    ) -> Result<Self> {
        let mut vars = Vec::new();
        let mut index = HashMap::new();
        for (name, shape) in shapes(kind, vision_dim, text_dim) {
            let t = tensors.get(&name).ok_or_else(|| {
                Error::Report(format!(
                    "the connector has no tensor multi_modal_projector.{name} (a {kind:?} connector between widths {vision_dim} and {text_dim})"
                ))
            })?;
            if t.dims() != shape.as_slice() {
                return Err(Error::Shape(format!(
                    "multi_modal_projector.{name} is {:?}, but a {kind:?} connector from a vision width of {vision_dim} to a text width of {text_dim} needs {shape:?}: does the vision tower match the connector?",
                    t.dims()
                )));
            }
            index.insert(name.clone(), vars.len());
            vars.push((name, Var::from_tensor(&t.to_dtype(DType::F32)?)?));
        }
        Ok(Self {
            kind,
            vars,
            index,
            vision_dim,
            text_dim,
        })
    }

    pub fn kind(&self) -> ConnectorKind {
        self.kind
    }

    pub fn vision_dim(&self) -> usize {
        self.vision_dim
    }

    pub fn text_dim(&self) -> usize {
        self.text_dim
    }

    /// The trainable parameters, named as saved (without the prefix).
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    fn get(&self, name: &str) -> &Tensor {
        self.vars[self.index[name]].1.as_tensor()
    }

    fn linear(&self, x: &Tensor, name: &str) -> Result<Tensor> {
        let w = self.get(&format!("{name}.weight"));
        let b = self.get(&format!("{name}.bias"));
        Ok(x.broadcast_matmul(&w.t()?)?.broadcast_add(b)?)
    }

    fn layer_norm(&self, x: &Tensor, name: &str) -> Result<Tensor> {
        let w = self.get(&format!("{name}.weight"));
        let b = self.get(&format!("{name}.bias"));
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc.broadcast_div(&(var + 1e-5)?.sqrt()?)?;
        Ok(xn.broadcast_mul(w)?.broadcast_add(b)?)
    }

    /// Patch features `[B, P, vision]` to image tokens `[B, N, text]`.
    pub fn forward(&self, patches: &Tensor) -> Result<Tensor> {
        let (b, _, v) = patches.dims3()?;
        if v != self.vision_dim {
            return Err(Error::Shape(format!(
                "the connector takes {}-wide patch features, got {v}",
                self.vision_dim
            )));
        }
        match self.kind {
            ConnectorKind::Mlp2xGelu => {
                let h = self.linear(patches, "linear_1")?.gelu_erf()?;
                self.linear(&h, "linear_2")
            }
            ConnectorKind::Resampler {
                queries,
                layers,
                heads,
            } => {
                let q0 = self.get("resampler.queries");
                let mut x = q0
                    .unsqueeze(0)?
                    .broadcast_as((b, queries, v))?
                    .contiguous()?;
                for l in 0..layers {
                    let p = format!("resampler.layers.{l}");
                    let qn = self.layer_norm(&x, &format!("{p}.norm_q"))?;
                    let kvn = self.layer_norm(patches, &format!("{p}.norm_kv"))?;
                    let a = self.cross_attention(&qn, &kvn, &format!("{p}.attn"), heads)?;
                    x = (x + a)?;
                    let f = self.layer_norm(&x, &format!("{p}.norm_ff"))?;
                    let f = self.linear(&f, &format!("{p}.ff.fc1"))?.gelu_erf()?;
                    x = (x + self.linear(&f, &format!("{p}.ff.fc2"))?)?;
                }
                let x = self.layer_norm(&x, "resampler.norm_out")?;
                self.linear(&x, "resampler.proj")
            }
        }
    }

    fn cross_attention(&self, q: &Tensor, kv: &Tensor, p: &str, heads: usize) -> Result<Tensor> {
        let (b, n, v) = q.dims3()?;
        let m = kv.dim(1)?;
        let hd = v / heads;
        let split = |x: Tensor, len: usize| -> Result<Tensor> {
            Ok(x.reshape((b, len, heads, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let qh = split(self.linear(q, &format!("{p}.q_proj"))?, n)?;
        let kh = split(self.linear(kv, &format!("{p}.k_proj"))?, m)?;
        let vh = split(self.linear(kv, &format!("{p}.v_proj"))?, m)?;
        let att = (qh.matmul(&kh.t()?)? / (hd as f64).sqrt())?;
        let att = candle_nn::ops::softmax(&att, D::Minus1)?;
        let o = att
            .matmul(&vh)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, n, v))?;
        self.linear(&o, &format!("{p}.o_proj"))
    }
}
