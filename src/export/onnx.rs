//! ONNX export of the towers: `vision.onnx` (pixel_values → image_embeds)
//! and `text.onnx` (input_ids → text_embeds), opset 17, with dynamic batch
//! and sequence axes, the weights as f32 initializers and the embeddings
//! L2-normalised as clasp's are. The graphs are built op by op from the
//! checkpoint's tensors (by transformers' names) and its config; nothing is
//! traced.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use prost::Message;

use super::proto::*;
use crate::model::config::{Activation, ClipConfig, VisionConfig};
use crate::model::ModelConfig;
use crate::{Error, Result};

pub const OPSET: i64 = 17;

/// A graph under construction: nodes in order, initializers by name.
struct Graph {
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    n: usize,
}

fn attr_i(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        i,
        r#type: ATTR_INT,
        ..Default::default()
    }
}

fn attr_f(name: &str, f: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        f,
        r#type: ATTR_FLOAT,
        ..Default::default()
    }
}

fn attr_ints(name: &str, ints: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        ints: ints.to_vec(),
        r#type: ATTR_INTS,
        ..Default::default()
    }
}

fn value_info(name: &str, elem: i32, dims: &[Result<i64, &str>]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TensorTypeProto {
                elem_type: elem,
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| Dimension {
                            value: Some(match d {
                                Ok(v) => DimValue::Value(*v),
                                Err(p) => DimValue::Param((*p).into()),
                            }),
                        })
                        .collect(),
                }),
            }),
        }),
    }
}

impl Graph {
    fn new() -> Self {
        Self {
            nodes: Vec::new(),
            inits: Vec::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            n: 0,
        }
    }

    fn fresh(&mut self, hint: &str) -> String {
        self.n += 1;
        format!("{hint}_{}", self.n)
    }

    /// An f32 initializer from a tensor.
    fn init(&mut self, hint: &str, t: &Tensor) -> Result<String> {
        let name = self.fresh(hint);
        let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        self.inits.push(TensorProto {
            dims: t.dims().iter().map(|&d| d as i64).collect(),
            data_type: FLOAT,
            name: name.clone(),
            raw_data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        });
        Ok(name)
    }

    fn scalar(&mut self, v: f32) -> String {
        let name = self.fresh("c");
        self.inits.push(TensorProto {
            dims: vec![],
            data_type: FLOAT,
            name: name.clone(),
            raw_data: v.to_le_bytes().to_vec(),
        });
        name
    }

    fn ints(&mut self, v: &[i64]) -> String {
        let name = self.fresh("i");
        self.inits.push(TensorProto {
            dims: vec![v.len() as i64],
            data_type: INT64,
            name: name.clone(),
            raw_data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        });
        name
    }

    fn op(&mut self, op: &str, inputs: &[&str], attribute: Vec<AttributeProto>) -> String {
        let out = self.fresh(op);
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.clone()],
            name: out.clone(),
            op_type: op.into(),
            attribute,
        });
        out
    }

    /// `x W^T + b` for a torch-layout weight [out, in].
    fn linear(&mut self, x: &str, w: &Tensor, b: Option<&Tensor>) -> Result<String> {
        let wt = self.init("w", &w.t()?.contiguous()?)?;
        let y = self.op("MatMul", &[x, &wt], vec![]);
        Ok(match b {
            Some(b) => {
                let b = self.init("b", b)?;
                self.op("Add", &[&y, &b], vec![])
            }
            None => y,
        })
    }

    fn layer_norm(&mut self, x: &str, w: &Tensor, b: &Tensor, eps: f64) -> Result<String> {
        let (w, b) = (self.init("ln_w", w)?, self.init("ln_b", b)?);
        Ok(self.op(
            "LayerNormalization",
            &[x, &w, &b],
            vec![attr_i("axis", -1), attr_f("epsilon", eps as f32)],
        ))
    }

    fn activation(&mut self, x: &str, act: Activation) -> String {
        match act {
            Activation::QuickGelu => {
                let k = self.scalar(1.702);
                let s = self.op("Mul", &[x, &k], vec![]);
                let g = self.op("Sigmoid", &[&s], vec![]);
                self.op("Mul", &[x, &g], vec![])
            }
            Activation::Gelu => {
                let r2 = self.scalar(std::f32::consts::SQRT_2);
                let d = self.op("Div", &[x, &r2], vec![]);
                let e = self.op("Erf", &[&d], vec![]);
                let one = self.scalar(1.0);
                let a = self.op("Add", &[&e, &one], vec![]);
                let h = self.scalar(0.5);
                let xh = self.op("Mul", &[x, &h], vec![]);
                self.op("Mul", &[&xh, &a], vec![])
            }
            Activation::GeluTanh => {
                let c = self.scalar(0.044715);
                let x2 = self.op("Mul", &[x, x], vec![]);
                let x3 = self.op("Mul", &[&x2, x], vec![]);
                let cx3 = self.op("Mul", &[&x3, &c], vec![]);
                let inner = self.op("Add", &[x, &cx3], vec![]);
                let k = self.scalar((2.0f32 / std::f32::consts::PI).sqrt());
                let ki = self.op("Mul", &[&inner, &k], vec![]);
                let t = self.op("Tanh", &[&ki], vec![]);
                let one = self.scalar(1.0);
                let a = self.op("Add", &[&t, &one], vec![]);
                let h = self.scalar(0.5);
                let xh = self.op("Mul", &[x, &h], vec![]);
                self.op("Mul", &[&xh, &a], vec![])
            }
            Activation::Relu => self.op("Relu", &[x], vec![]),
        }
    }

    fn finish(self, name: &str) -> ModelProto {
        ModelProto {
            ir_version: 8,
            producer_name: "clasp".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            graph: Some(GraphProto {
                node: self.nodes,
                name: name.into(),
                initializer: self.inits,
                input: self.inputs,
                output: self.outputs,
            }),
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: OPSET,
            }],
        }
    }
}

/// The checkpoint's tensors by transformers' names.
struct Weights<'a> {
    t: &'a HashMap<String, Tensor>,
    path: &'a Path,
}

impl Weights<'_> {
    fn get(&self, name: &str) -> Result<&Tensor> {
        self.t.get(name).ok_or_else(|| Error::Weights {
            path: self.path.to_path_buf(),
            reason: format!("missing tensor `{name}`"),
        })
    }
}

/// The shape of a tower's transformer blocks.
#[derive(Clone, Copy)]
struct Block {
    heads: usize,
    hidden: usize,
    eps: f64,
    act: Activation,
}

/// A pre-norm transformer block (CLIP's and SigLIP's) over `x` [B, T, C],
/// with an optional additive attention mask broadcastable to [B, H, T, T].
fn pre_norm_block(
    g: &mut Graph,
    w: &Weights,
    p: &str,
    x: &str,
    b: Block,
    mask: Option<&str>,
) -> Result<String> {
    let Block {
        heads,
        hidden,
        eps,
        act,
    } = b;
    let d = hidden / heads;
    let h1 = g.layer_norm(
        x,
        w.get(&format!("{p}.layer_norm1.weight"))?,
        w.get(&format!("{p}.layer_norm1.bias"))?,
        eps,
    )?;
    let proj = |g: &mut Graph, n: &str| -> Result<String> {
        let y = g.linear(
            &h1,
            w.get(&format!("{p}.self_attn.{n}.weight"))?,
            Some(w.get(&format!("{p}.self_attn.{n}.bias"))?),
        )?;
        let shape = g.ints(&[0, 0, heads as i64, d as i64]);
        let r = g.op("Reshape", &[&y, &shape], vec![]);
        Ok(g.op("Transpose", &[&r], vec![attr_ints("perm", &[0, 2, 1, 3])]))
    };
    let (q, k, v) = (proj(g, "q_proj")?, proj(g, "k_proj")?, proj(g, "v_proj")?);
    let kt = g.op("Transpose", &[&k], vec![attr_ints("perm", &[0, 1, 3, 2])]);
    let s = g.op("MatMul", &[&q, &kt], vec![]);
    let scale = g.scalar((d as f32).powf(-0.5));
    let mut s = g.op("Mul", &[&s, &scale], vec![]);
    if let Some(m) = mask {
        s = g.op("Add", &[&s, m], vec![]);
    }
    let pr = g.op("Softmax", &[&s], vec![attr_i("axis", -1)]);
    let a = g.op("MatMul", &[&pr, &v], vec![]);
    let a = g.op("Transpose", &[&a], vec![attr_ints("perm", &[0, 2, 1, 3])]);
    let shape = g.ints(&[0, 0, hidden as i64]);
    let a = g.op("Reshape", &[&a, &shape], vec![]);
    let o = g.linear(
        &a,
        w.get(&format!("{p}.self_attn.out_proj.weight"))?,
        Some(w.get(&format!("{p}.self_attn.out_proj.bias"))?),
    )?;
    let x = g.op("Add", &[x, &o], vec![]);
    let h2 = g.layer_norm(
        &x,
        w.get(&format!("{p}.layer_norm2.weight"))?,
        w.get(&format!("{p}.layer_norm2.bias"))?,
        eps,
    )?;
    let f1 = g.linear(
        &h2,
        w.get(&format!("{p}.mlp.fc1.weight"))?,
        Some(w.get(&format!("{p}.mlp.fc1.bias"))?),
    )?;
    let a = g.activation(&f1, act);
    let f2 = g.linear(
        &a,
        w.get(&format!("{p}.mlp.fc2.weight"))?,
        Some(w.get(&format!("{p}.mlp.fc2.bias"))?),
    )?;
    Ok(g.op("Add", &[&x, &f2], vec![]))
}

/// CLIP's image tower with its projection: pixel_values [batch, C, S, S]
/// to L2-normalised image_embeds [batch, P].
fn clip_vision(w: &Weights, v: &VisionConfig) -> Result<ModelProto> {
    let mut g = Graph::new();
    let (c, s, p, h) = (v.num_channels, v.image_size, v.patch_size, v.hidden_size);
    g.inputs.push(value_info(
        "pixel_values",
        FLOAT,
        &[Err("batch"), Ok(c as i64), Ok(s as i64), Ok(s as i64)],
    ));
    let conv = g.init(
        "patch",
        w.get("vision_model.embeddings.patch_embedding.weight")?,
    )?;
    let pe = g.op(
        "Conv",
        &["pixel_values", &conv],
        vec![
            attr_ints("strides", &[p as i64, p as i64]),
            attr_ints("kernel_shape", &[p as i64, p as i64]),
        ],
    );
    let shape = g.ints(&[0, h as i64, -1]);
    let flat = g.op("Reshape", &[&pe, &shape], vec![]);
    let tok = g.op("Transpose", &[&flat], vec![attr_ints("perm", &[0, 2, 1])]);
    let shp = g.op("Shape", &["pixel_values"], vec![]);
    let (z, one) = (g.ints(&[0]), g.ints(&[1]));
    let b = g.op("Slice", &[&shp, &z, &one], vec![]);
    let rest = g.ints(&[1, h as i64]);
    let cls_shape = g.op("Concat", &[&b, &rest], vec![attr_i("axis", 0)]);
    let cls = g.init(
        "cls",
        &w.get("vision_model.embeddings.class_embedding")?
            .reshape((1, 1, h))?,
    )?;
    let cls = g.op("Expand", &[&cls, &cls_shape], vec![]);
    let x = g.op("Concat", &[&cls, &tok], vec![attr_i("axis", 1)]);
    let pos = w.get("vision_model.embeddings.position_embedding.weight")?;
    let pos = g.init("pos", &pos.unsqueeze(0)?)?;
    let x = g.op("Add", &[&x, &pos], vec![]);
    let mut x = g.layer_norm(
        &x,
        w.get("vision_model.pre_layrnorm.weight")?,
        w.get("vision_model.pre_layrnorm.bias")?,
        v.layer_norm_eps,
    )?;
    for i in 0..v.num_hidden_layers {
        x = pre_norm_block(
            &mut g,
            w,
            &format!("vision_model.encoder.layers.{i}"),
            &x,
            Block {
                heads: v.num_attention_heads,
                hidden: h,
                eps: v.layer_norm_eps,
                act: v.hidden_act,
            },
            None,
        )?;
    }
    let zero = g.ints(&[0]);
    let first = g.op("Gather", &[&x, &zero], vec![attr_i("axis", 1)]); // [B, 1, H]
    let first = g.op("Squeeze", &[&first, &one], vec![]);
    let pooled = g.layer_norm(
        &first,
        w.get("vision_model.post_layernorm.weight")?,
        w.get("vision_model.post_layernorm.bias")?,
        v.layer_norm_eps,
    )?;
    let emb = g.linear(&pooled, w.get("visual_projection.weight")?, None)?;
    g.op(
        "LpNormalization",
        &[&emb],
        vec![attr_i("axis", -1), attr_i("p", 2)],
    );
    g.nodes.last_mut().expect("just pushed").output = vec!["image_embeds".into()];
    let pdim = w.get("visual_projection.weight")?.dim(0)?;
    g.outputs.push(value_info(
        "image_embeds",
        FLOAT,
        &[Err("batch"), Ok(pdim as i64)],
    ));
    Ok(g.finish("clasp_vision"))
}

/// CLIP's text tower with its projection: input_ids [batch, sequence]
/// (int64, padded anyhow: the causal mask makes padding after the pooled
/// token irrelevant) to L2-normalised text_embeds [batch, P].
fn clip_text(w: &Weights, cfg: &ClipConfig) -> Result<ModelProto> {
    let t = &cfg.text_config;
    let h = t.hidden_size;
    let mut g = Graph::new();
    g.inputs.push(value_info(
        "input_ids",
        INT64,
        &[Err("batch"), Err("sequence")],
    ));
    let te = g.init(
        "tok",
        w.get("text_model.embeddings.token_embedding.weight")?,
    )?;
    let tok = g.op("Gather", &[&te, "input_ids"], vec![attr_i("axis", 0)]);
    let shp = g.op("Shape", &["input_ids"], vec![]);
    let (z, one, two) = (g.ints(&[0]), g.ints(&[1]), g.ints(&[2]));
    let seq = g.op("Slice", &[&shp, &one, &two], vec![]);
    let pe = g.init(
        "pos",
        w.get("text_model.embeddings.position_embedding.weight")?,
    )?;
    let pos = g.op("Slice", &[&pe, &z, &seq, &z], vec![]);
    let x = g.op("Add", &[&tok, &pos], vec![]);
    // Causal mask [T, T]: the lowest f32 above the diagonal, 0 elsewhere.
    let tt = g.op("Concat", &[&seq, &seq], vec![attr_i("axis", 0)]);
    let fill = TensorProto {
        dims: vec![1],
        data_type: FLOAT,
        name: String::new(),
        raw_data: f32::MIN.to_le_bytes().to_vec(),
    };
    let full = g.op(
        "ConstantOfShape",
        &[&tt],
        vec![AttributeProto {
            name: "value".into(),
            t: Some(fill),
            r#type: ATTR_TENSOR,
            ..Default::default()
        }],
    );
    let k1 = {
        let name = g.fresh("k");
        g.inits.push(TensorProto {
            dims: vec![],
            data_type: INT64,
            name: name.clone(),
            raw_data: 1i64.to_le_bytes().to_vec(),
        });
        name
    };
    let mask = g.op("Trilu", &[&full, &k1], vec![attr_i("upper", 1)]);
    let mut x = x;
    for i in 0..t.num_hidden_layers {
        x = pre_norm_block(
            &mut g,
            w,
            &format!("text_model.encoder.layers.{i}"),
            &x,
            Block {
                heads: t.num_attention_heads,
                hidden: h,
                eps: t.layer_norm_eps,
                act: t.hidden_act,
            },
            Some(&mask),
        )?;
    }
    let x = g.layer_norm(
        &x,
        w.get("text_model.final_layer_norm.weight")?,
        w.get("text_model.final_layer_norm.bias")?,
        t.layer_norm_eps,
    )?;
    // transformers' pooling: the largest id's first position for the
    // legacy eos_token_id 2, else the first eos_token_id.
    let idx = if t.eos_token_id == 2 {
        g.op(
            "ArgMax",
            &["input_ids"],
            vec![attr_i("axis", -1), attr_i("keepdims", 1)],
        )
    } else {
        let eos = g.ints(&[t.eos_token_id as i64]);
        let eq = g.op("Equal", &["input_ids", &eos], vec![]);
        let as_int = g.op("Cast", &[&eq], vec![attr_i("to", 6)]);
        g.op(
            "ArgMax",
            &[&as_int],
            vec![attr_i("axis", -1), attr_i("keepdims", 1)],
        )
    };
    let pooled = g.op("GatherND", &[&x, &idx], vec![attr_i("batch_dims", 1)]);
    let emb = g.linear(&pooled, w.get("text_projection.weight")?, None)?;
    g.op(
        "LpNormalization",
        &[&emb],
        vec![attr_i("axis", -1), attr_i("p", 2)],
    );
    g.nodes.last_mut().expect("just pushed").output = vec!["text_embeds".into()];
    let pdim = w.get("text_projection.weight")?.dim(0)?;
    g.outputs.push(value_info(
        "text_embeds",
        FLOAT,
        &[Err("batch"), Ok(pdim as i64)],
    ));
    Ok(g.finish("clasp_text"))
}

/// The two graphs of a model, serialised: (vision.onnx, text.onnx).
pub fn export(
    config: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
    path: &Path,
) -> Result<(Vec<u8>, Vec<u8>)> {
    let w = Weights { t: tensors, path };
    match config {
        ModelConfig::Clip(c) => Ok((
            clip_vision(&w, &c.vision_config)?.encode_to_vec(),
            clip_text(&w, c)?.encode_to_vec(),
        )),
        other => Err(Error::Report(format!(
            "ONNX export supports clip (and open_clip's ViT models) so far, not {}",
            other.model_type()
        ))),
    }
}
