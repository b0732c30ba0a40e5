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
//! - `qformer`: BLIP-2's Q-Former (transformers' `Blip2QFormerModel`, from
//!   clasp-core) on the patch tokens: N learned `query_tokens`, L BERT
//!   layers (each with cross-attention to the patches), 64 channels per
//!   head, then `language_projection` to the text width; saved under
//!   `multi_modal_projector.` in BLIP-2's own names (`query_tokens`,
//!   `qformer.*`, `language_projection.*`).
//!
//! All are plain candle ops on tensors held as `Var`s, so the same code
//! computes the forward pass for inference and, with a graph, the gradients
//! of training.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var, D};
use serde::{Deserialize, Serialize};

use crate::rng::Rng;
use crate::{Error, Result};
use clasp_core::model::qformer::{QFormer, QFormerConfig};

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
    #[serde(rename = "qformer")]
    QFormer {
        /// Learned query tokens: the image tokens the LLM sees.
        queries: usize,
        /// BERT layers.
        layers: usize,
        /// Attention heads of `head_dim` channels: the Q-Former is
        /// head_dim·heads wide (feed-forward 4× that).
        heads: usize,
        /// Channels per head (64, BERT-base's, unless a pretrained
        /// Q-Former says otherwise: MiniLM's is 32).
        #[serde(default = "d_head_dim")]
        head_dim: usize,
        /// Every this many layers has cross-attention to the patches (1:
        /// all; BLIP-2's is 2).
        #[serde(default = "d_one")]
        cross_every: usize,
        /// The feed-forward's width when not 4× the Q-Former's.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        intermediate: Option<usize>,
    },
}

/// The Q-Former's channels per attention head (BERT-base's).
pub const QFORMER_HEAD_DIM: usize = 64;

fn d_head_dim() -> usize {
    QFORMER_HEAD_DIM
}
fn d_one() -> usize {
    1
}

/// The `Blip2QFormerConfig` of a `qformer` connector (`kind` is one) on
/// `vision`-wide patches.
pub fn qformer_config(kind: ConnectorKind, vision: usize) -> QFormerConfig {
    let ConnectorKind::QFormer {
        layers,
        heads,
        head_dim,
        cross_every,
        intermediate,
        ..
    } = kind
    else {
        unreachable!("a Q-Former connector's config")
    };
    let h = head_dim * heads;
    serde_json::from_value(serde_json::json!({
        "hidden_size": h,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": intermediate.unwrap_or(4 * h),
        "cross_attention_frequency": cross_every,
        "encoder_hidden_size": vision,
        "use_qformer_text_input": false,
    }))
    .expect("a valid Q-Former config")
}

impl ConnectorKind {
    /// A Q-Former connector of BERT-base's heads (64 channels), with
    /// cross-attention in every layer.
    pub fn qformer(queries: usize, layers: usize, heads: usize) -> Self {
        Self::QFormer {
            queries,
            layers,
            heads,
            head_dim: QFORMER_HEAD_DIM,
            cross_every: 1,
            intermediate: None,
        }
    }
}

impl ConnectorKind {
    /// Image tokens per image given `patches` patch tokens.
    pub fn tokens(&self, patches: usize) -> usize {
        match self {
            Self::Mlp2xGelu => patches,
            Self::Resampler { queries, .. } | Self::QFormer { queries, .. } => *queries,
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
        ConnectorKind::QFormer { queries, .. } => {
            let cfg = qformer_config(kind, v);
            let h = cfg.hidden_size;
            out.push(("query_tokens".into(), vec![1, queries, h]));
            for (k, s) in cfg.param_shapes() {
                out.push((format!("qformer.{k}"), s));
            }
            out.push(("language_projection.weight".into(), vec![t, h]));
            out.push(("language_projection.bias".into(), vec![t]));
        }
    }
    out
}

/// A fresh parameter: BERT's initialisation for the Q-Former (weights
/// N(0, 0.02²)-like, biases 0, LayerNorms 1 and 0), else torch's `nn.Linear`
/// (uniform ±1/√fan_in, weight and bias), LayerNorms at 1 and 0, queries
/// N(0, 0.02²)-like; `fan_in` is the layer's input width.
fn init(rng: &mut Rng, name: &str, shape: &[usize], fan_in: usize) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let norm = name.contains(".norm_") || name.contains("LayerNorm") || name.contains("layernorm");
    let std02 = 0.02 * 3f64.sqrt();
    if norm && name.ends_with(".weight") {
        vec![1f32; n]
    } else if norm {
        vec![0f32; n]
    } else if name.ends_with("queries") || name == "query_tokens" {
        rng.symmetric(n, std02)
    } else if name.starts_with("qformer.") && name.ends_with(".bias") {
        vec![0f32; n]
    } else if name.starts_with("qformer.") {
        rng.symmetric(n, std02)
    } else {
        rng.symmetric(n, 1.0 / (fan_in as f64).sqrt())
    }
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
        if let ConnectorKind::QFormer { heads, queries, .. } = kind {
            if heads == 0 || queries == 0 {
                return Err(Error::Report(
                    "qformer: it needs at least one head and one query".into(),
                ));
            }
        }
        let mut rng = Rng(seed ^ 0xC0_77EC);
        let specs = shapes(kind, vision_dim, text_dim);
        let mut tensors = HashMap::new();
        for (i, (name, shape)) in specs.iter().enumerate() {
            // A bias takes its weight's fan-in (the weight comes first).
            let fan_in = match (name.ends_with(".bias"), i) {
                (true, i) if i > 0 && specs[i - 1].1.len() == 2 => specs[i - 1].1[1],
                _ => shape.get(1).copied().unwrap_or(1),
            };
            let v = init(&mut rng, name, shape, fan_in);
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
            ConnectorKind::QFormer { .. } => {
                let q = self.query_outputs(patches)?;
                self.linear(&q, "language_projection")
            }
        }
    }

    /// A Q-Former connector's query outputs `[B, N, qformer width]` (the
    /// Q-Former's last hidden state, before `language_projection`).
    pub fn query_outputs(&self, patches: &Tensor) -> Result<Tensor> {
        if !matches!(self.kind, ConnectorKind::QFormer { .. }) {
            return Err(Error::Report(
                "query outputs: the connector is not a Q-Former".into(),
            ));
        }
        // The layers read the variables' own tensors, so gradients reach
        // them.
        let cfg = qformer_config(self.kind, self.vision_dim);
        let tensors: HashMap<String, Tensor> = self
            .vars
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("qformer.")
                    .map(|k| (k.to_string(), v.as_tensor().clone()))
            })
            .collect();
        let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, patches.device());
        let qformer = QFormer::load(vb, &cfg)?;
        qformer.queries(self.get("query_tokens"), &patches.contiguous()?)
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
