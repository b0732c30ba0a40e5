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
use crate::model::config::{
    Activation, BertConfig, ChineseClipConfig, ClipConfig, SiglipConfig, TextPooling, VisionConfig,
};
use crate::model::int8::QuantMatrix;
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

    /// An int64 scalar initializer.
    fn int_scalar(&mut self, v: i64) -> String {
        let name = self.fresh("k");
        self.inits.push(TensorProto {
            dims: vec![],
            data_type: INT64,
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

    /// `x W^T + b` as clasp's `--precision int8` computes it: `x` quantized
    /// per row (per token) to symmetric int8 with `s_x = max|x_row| / 127`,
    /// rounded half to even (ONNX's `Round`, as clasp's kernels), multiplied
    /// exactly in int32 by the per-channel int8 weights (`MatMulInteger`),
    /// then `acc * s_x * s_w + b` in f32. (NaN rows give NaN, as in clasp.)
    fn linear_int8(&mut self, x: &str, q: &QuantMatrix, b: Option<&Tensor>) -> Result<String> {
        let (n, k) = (q.rows(), q.cols());
        let rows = q.to_int8();
        let mut wt = vec![0u8; n * k];
        for (o, row) in rows.chunks(k.max(1)).enumerate() {
            for (i, &v) in row.iter().enumerate() {
                wt[i * n + o] = v as u8;
            }
        }
        let wq = self.fresh("wq");
        self.inits.push(TensorProto {
            dims: vec![k as i64, n as i64],
            data_type: INT8,
            name: wq.clone(),
            raw_data: wt,
        });
        let sw = self.fresh("sw");
        self.inits.push(TensorProto {
            dims: vec![n as i64],
            data_type: FLOAT,
            name: sw.clone(),
            raw_data: q.scales().iter().flat_map(|x| x.to_le_bytes()).collect(),
        });
        let ab = self.op("Abs", &[x], vec![]);
        let m = self.op(
            "ReduceMax",
            &[&ab],
            vec![attr_ints("axes", &[-1]), attr_i("keepdims", 1)],
        );
        // An all-zero row quantizes to zeros with scale 0, as clasp's: the
        // divisor is 1 there instead of 0 (which would make 0 * inf = NaN).
        let zero = self.scalar(0.0);
        let is0 = self.op("Equal", &[&m, &zero], vec![]);
        let one = self.scalar(1.0);
        let safe = self.op("Where", &[&is0, &one, &m], vec![]);
        let c127 = self.scalar(127.0);
        let inv = self.op("Div", &[&c127, &safe], vec![]);
        // |x * inv| <= 127 (1 + 2^-23) here, which rounds to at most 127:
        // no clip needed.
        let y = self.op("Mul", &[x, &inv], vec![]);
        let r = self.op("Round", &[&y], vec![]);
        // As uint8 `q + 128` with zero point 128: the same products, and
        // the operand order ONNX Runtime's fast kernels take (u8 × s8);
        // its int8 × int8 path measured 4× slower than the f32 graph.
        let c128 = self.scalar(128.0);
        let r = self.op("Add", &[&r, &c128], vec![]);
        let xq = self.op("Cast", &[&r], vec![attr_i("to", UINT8 as i64)]);
        let zp = self.fresh("zp");
        self.inits.push(TensorProto {
            dims: vec![],
            data_type: UINT8,
            name: zp.clone(),
            raw_data: vec![128],
        });
        let acc = self.op("MatMulInteger", &[&xq, &wq, &zp], vec![]);
        let f = self.op("Cast", &[&acc], vec![attr_i("to", FLOAT as i64)]);
        let sx = self.op("Div", &[&m, &c127], vec![]);
        let y = self.op("Mul", &[&f, &sx], vec![]);
        let y = self.op("Mul", &[&y, &sw], vec![]);
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
    /// In int8 export, the int8 weights a quantized checkpoint holds (by
    /// layer name); the other block linears are quantized from f32.
    int8: Option<&'a HashMap<String, QuantMatrix>>,
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
        let y = block_linear(g, w, &h1, &format!("{p}.self_attn.{n}"))?;
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
    let o = block_linear(g, w, &a, &format!("{p}.self_attn.out_proj"))?;
    let x = g.op("Add", &[x, &o], vec![]);
    let h2 = g.layer_norm(
        &x,
        w.get(&format!("{p}.layer_norm2.weight"))?,
        w.get(&format!("{p}.layer_norm2.bias"))?,
        eps,
    )?;
    let f1 = block_linear(g, w, &h2, &format!("{p}.mlp.fc1"))?;
    let a = g.activation(&f1, act);
    let f2 = block_linear(g, w, &a, &format!("{p}.mlp.fc2"))?;
    Ok(g.op("Add", &[&x, &f2], vec![]))
}

/// A transformer block's attention or MLP linear: int8 in an int8 export
/// (exactly the linears `Model::quantize_int8` quantizes), else f32.
fn block_linear(g: &mut Graph, w: &Weights, x: &str, prefix: &str) -> Result<String> {
    let Some(given) = w.int8 else {
        return named_linear(g, w, x, prefix);
    };
    let bias = w.get(&format!("{prefix}.bias"))?;
    let q = match given.get(prefix) {
        Some(q) => q.clone(),
        None => {
            let wt = w.get(&format!("{prefix}.weight"))?;
            let (n, k) = wt.dims2()?;
            let v = wt.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            QuantMatrix::quantize(&v, n, k).map_err(|e| Error::Weights {
                path: w.path.to_path_buf(),
                reason: format!("{prefix}: {e}"),
            })?
        }
    };
    g.linear_int8(x, &q, Some(bias))
}

/// The linear layer stored as `{prefix}.weight` and `{prefix}.bias`.
fn named_linear(g: &mut Graph, w: &Weights, x: &str, prefix: &str) -> Result<String> {
    g.linear(
        x,
        w.get(&format!("{prefix}.weight"))?,
        Some(w.get(&format!("{prefix}.bias"))?),
    )
}

/// Token plus position embeddings of `input_ids` [batch, sequence] →
/// (x [B, T, C], the sequence length as a 1-element int64 tensor).
fn token_and_position(g: &mut Graph, tok: &Tensor, pos: &Tensor) -> Result<(String, String)> {
    let te = g.init("tok", tok)?;
    let t = g.op("Gather", &[&te, "input_ids"], vec![attr_i("axis", 0)]);
    let shp = g.op("Shape", &["input_ids"], vec![]);
    let (z, one, two) = (g.ints(&[0]), g.ints(&[1]), g.ints(&[2]));
    let seq = g.op("Slice", &[&shp, &one, &two], vec![]);
    let pe = g.init("pos", pos)?;
    let p = g.op("Slice", &[&pe, &z, &seq, &z], vec![]);
    Ok((g.op("Add", &[&t, &p], vec![]), seq))
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
    let pdim = w.get("visual_projection.weight")?.dim(0)?;
    normalized_output(&mut g, &emb, "image_embeds", pdim);
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
    let (x, seq) = token_and_position(
        &mut g,
        w.get("text_model.embeddings.token_embedding.weight")?,
        w.get("text_model.embeddings.position_embedding.weight")?,
    )?;
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
    let k1 = g.int_scalar(1);
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
    let pdim = w.get("text_projection.weight")?.dim(0)?;
    normalized_output(&mut g, &emb, "text_embeds", pdim);
    Ok(g.finish("clasp_text"))
}

/// `x` [B, C] L2-normalised into the graph output `name` [B, dim].
fn normalized_output(g: &mut Graph, x: &str, name: &str, dim: usize) {
    g.op(
        "LpNormalization",
        &[x],
        vec![attr_i("axis", -1), attr_i("p", 2)],
    );
    g.nodes.last_mut().expect("just pushed").output = vec![name.into()];
    g.outputs
        .push(value_info(name, FLOAT, &[Err("batch"), Ok(dim as i64)]));
}

/// SigLIP's image tower with its attention-pooling head: pixel_values
/// [batch, C, S, S] to L2-normalised image_embeds [batch, C].
fn siglip_vision(w: &Weights, c: &SiglipConfig) -> Result<ModelProto> {
    let v = &c.vision_config;
    if let Some(n) = v.num_patches {
        return siglip2_vision(w, c, n);
    }
    let mut g = Graph::new();
    let (ch, s, p, h) = (v.num_channels, v.image_size, v.patch_size, v.hidden_size);
    g.inputs.push(value_info(
        "pixel_values",
        FLOAT,
        &[Err("batch"), Ok(ch as i64), Ok(s as i64), Ok(s as i64)],
    ));
    let e = "vision_model.embeddings";
    let conv = g.init("patch", w.get(&format!("{e}.patch_embedding.weight"))?)?;
    let cb = g.init("patch_b", w.get(&format!("{e}.patch_embedding.bias"))?)?;
    let pe = g.op(
        "Conv",
        &["pixel_values", &conv, &cb],
        vec![
            attr_ints("strides", &[p as i64, p as i64]),
            attr_ints("kernel_shape", &[p as i64, p as i64]),
        ],
    );
    let shape = g.ints(&[0, h as i64, -1]);
    let flat = g.op("Reshape", &[&pe, &shape], vec![]);
    let tok = g.op("Transpose", &[&flat], vec![attr_ints("perm", &[0, 2, 1])]);
    let pos = g.init(
        "pos",
        &w.get(&format!("{e}.position_embedding.weight"))?
            .unsqueeze(0)?,
    )?;
    let x = g.op("Add", &[&tok, &pos], vec![]);
    siglip_vision_rest(&mut g, w, c, x, None)?;
    Ok(g.finish("clasp_vision"))
}

/// The int64 [B, T] mask input `name` as f32 [B, T], and as the additive
/// key mask [B, 1, 1, T] that transformers builds: padding keys get the
/// lowest f32 added.
fn key_mask(g: &mut Graph, name: &str) -> (String, String) {
    let mf = g.op("Cast", &[name], vec![attr_i("to", FLOAT as i64)]);
    let onef = g.scalar(1.0);
    let inv = g.op("Sub", &[&onef, &mf], vec![]);
    let low = g.scalar(f32::MIN);
    let add = g.op("Mul", &[&inv, &low], vec![]);
    let axes = g.ints(&[1, 2]);
    let add = g.op("Unsqueeze", &[&add, &axes], vec![]);
    (mf, add)
}

/// SigLIP 2's image tower, NaFlex: transformers' inputs (pixel_values
/// [batch, N, p*p*C] patches, channels last; pixel_attention_mask [batch, N];
/// spatial_shapes [batch, 2], each image's patch grid) to L2-normalised
/// image_embeds. Each image's positions are the [g, g] table resized to its
/// grid by antialiased bilinear weights (torch's, `align_corners=False`),
/// computed in the graph from its grid, so one batch mixes aspect ratios.
fn siglip2_vision(w: &Weights, c: &SiglipConfig, n_table: usize) -> Result<ModelProto> {
    let v = &c.vision_config;
    let (ch, p) = (v.num_channels, v.patch_size);
    let g_side = (n_table as f64).sqrt().round() as usize;
    let mut g = Graph::new();
    g.inputs.push(value_info(
        "pixel_values",
        FLOAT,
        &[Err("batch"), Err("patches"), Ok((p * p * ch) as i64)],
    ));
    g.inputs.push(value_info(
        "pixel_attention_mask",
        INT64,
        &[Err("batch"), Err("patches")],
    ));
    g.inputs
        .push(value_info("spatial_shapes", INT64, &[Err("batch"), Ok(2)]));
    let e = "vision_model.embeddings";
    // The checkpoint's weight reads channel-last patches as they come.
    let x = named_linear(&mut g, w, "pixel_values", &format!("{e}.patch_embedding"))?;

    // Patch n of image b sits at row n / w_b, column n % w_b of its grid.
    let shp = g.op("Shape", &["pixel_values"], vec![]);
    let (one, two) = (g.ints(&[1]), g.ints(&[2]));
    let n = g.op("Slice", &[&shp, &one, &two], vec![]);
    let z0 = g.ints(&[0]);
    let n0 = g.op("Squeeze", &[&n, &z0], vec![]);
    let (start, step) = (g.int_scalar(0), g.int_scalar(1));
    let idx = g.op("Range", &[&start, &n0, &step], vec![]); // [N]
    let idx = g.op("Unsqueeze", &[&idx, &z0], vec![]); // [1, N]
    let (i0, i1) = (g.ints(&[0]), g.ints(&[1]));
    // spatial_shapes[:, 0:1] and [:, 1:2]: each image's rows and columns.
    let gh = g.op("Slice", &["spatial_shapes", &i0, &i1, &one], vec![]);
    let gw = g.op("Slice", &["spatial_shapes", &i1, &two, &one], vec![]);
    let row = g.op("Div", &[&idx, &gw], vec![]); // [B, N] (integer division)
    let colx = g.op("Mod", &[&idx, &gw], vec![]);
    let to_f = |g: &mut Graph, t: &str| g.op("Cast", &[t], vec![attr_i("to", FLOAT as i64)]);
    let (row, colx, ghf, gwf) = (
        to_f(&mut g, &row),
        to_f(&mut g, &colx),
        to_f(&mut g, &gh),
        to_f(&mut g, &gw),
    );
    // Triangle weights over the g source positions, widened when shrinking,
    // normalised to sum 1 (the padding's all-zero rows stay zero).
    let src: Vec<f32> = (0..g_side).map(|s| s as f32).collect();
    let src_t = Tensor::from_vec(src, (1, 1, g_side), &candle_core::Device::Cpu)?;
    let src = g.init("src", &src_t)?;
    let axis_weights = |g: &mut Graph, o: &str, out_n: &str| -> String {
        let gs = g.scalar(g_side as f32);
        let scale = g.op("Div", &[&gs, out_n], vec![]); // [B, 1]
        let half = g.scalar(0.5);
        let oc = g.op("Add", &[o, &half], vec![]);
        let oc = g.op("Mul", &[&oc, &scale], vec![]);
        let center = g.op("Sub", &[&oc, &half], vec![]); // [B, N]
        let onef = g.scalar(1.0);
        let support = g.op("Max", &[&scale, &onef], vec![]); // [B, 1]
        let axes = g.ints(&[2]);
        let center = g.op("Unsqueeze", &[&center, &axes], vec![]); // [B, N, 1]
        let support = g.op("Unsqueeze", &[&support, &axes], vec![]); // [B, 1, 1]
        let d = g.op("Sub", &[&src, &center], vec![]);
        let d = g.op("Abs", &[&d], vec![]);
        let d = g.op("Div", &[&d, &support], vec![]);
        let t = g.op("Sub", &[&onef, &d], vec![]);
        let zero = g.scalar(0.0);
        let t = g.op("Max", &[&t, &zero], vec![]); // [B, N, g]
        let sum = g.op("ReduceSum", &[&t, &axes], vec![attr_i("keepdims", 1)]);
        let tiny = g.scalar(1e-30);
        let sum = g.op("Max", &[&sum, &tiny], vec![]);
        g.op("Div", &[&t, &sum], vec![])
    };
    let wy = axis_weights(&mut g, &row, &ghf);
    let wx = axis_weights(&mut g, &colx, &gwf);
    let a3 = g.ints(&[3]);
    let wy = g.op("Unsqueeze", &[&wy, &a3], vec![]); // [B, N, g, 1]
    let a2 = g.ints(&[2]);
    let wx = g.op("Unsqueeze", &[&wx, &a2], vec![]); // [B, N, 1, g]
    let wxy = g.op("Mul", &[&wy, &wx], vec![]);
    let flat = g.ints(&[0, 0, (g_side * g_side) as i64]);
    let wxy = g.op("Reshape", &[&wxy, &flat], vec![]); // [B, N, g*g]
    let table = g.init("pos", w.get(&format!("{e}.position_embedding.weight"))?)?;
    let pos = g.op("MatMul", &[&wxy, &table], vec![]); // [B, N, C]
    let x = g.op("Add", &[&x, &pos], vec![]);

    let (_, add) = key_mask(&mut g, "pixel_attention_mask");
    siglip_vision_rest(&mut g, w, c, x, Some(&add))?;
    Ok(g.finish("clasp_vision"))
}

/// SigLIP's tower after the embeddings: the blocks, the post-norm and the
/// attention-pooling head over `x` [B, N, C], with an additive key mask
/// ([B, 1, 1, N]) for NaFlex's padding; writes `image_embeds`.
fn siglip_vision_rest(
    g: &mut Graph,
    w: &Weights,
    c: &SiglipConfig,
    mut x: String,
    mask: Option<&str>,
) -> Result<()> {
    let v = &c.vision_config;
    let h = v.hidden_size;
    let blk = Block {
        heads: v.num_attention_heads,
        hidden: h,
        eps: v.layer_norm_eps,
        act: v.hidden_act,
    };
    for i in 0..v.num_hidden_layers {
        x = pre_norm_block(
            g,
            w,
            &format!("vision_model.encoder.layers.{i}"),
            &x,
            blk,
            mask,
        )?;
    }
    let x = g.layer_norm(
        &x,
        w.get("vision_model.post_layernorm.weight")?,
        w.get("vision_model.post_layernorm.bias")?,
        v.layer_norm_eps,
    )?;
    // The head: one learned probe attends over the tokens.
    let hp = "vision_model.head";
    let (heads, d) = (v.num_attention_heads, h / v.num_attention_heads);
    let inw = w.get(&format!("{hp}.attention.in_proj_weight"))?;
    let inb = w.get(&format!("{hp}.attention.in_proj_bias"))?;
    let part =
        |t: &Tensor, i: usize| -> Result<Tensor> { Ok(t.narrow(0, i * h, h)?.contiguous()?) };
    let probe = g.init("probe", w.get(&format!("{hp}.probe"))?)?;
    let split = |g: &mut Graph, t: &str, lead: i64| -> String {
        let shape = g.ints(&[lead, 0, heads as i64, d as i64]);
        let r = g.op("Reshape", &[t, &shape], vec![]);
        g.op("Transpose", &[&r], vec![attr_ints("perm", &[0, 2, 1, 3])])
    };
    let q = g.linear(&probe, &part(inw, 0)?, Some(&part(inb, 0)?))?;
    let q = split(g, &q, 1);
    let k = g.linear(&x, &part(inw, 1)?, Some(&part(inb, 1)?))?;
    let k = split(g, &k, 0);
    let vv = g.linear(&x, &part(inw, 2)?, Some(&part(inb, 2)?))?;
    let vv = split(g, &vv, 0);
    let kt = g.op("Transpose", &[&k], vec![attr_ints("perm", &[0, 1, 3, 2])]);
    let sc = g.op("MatMul", &[&q, &kt], vec![]);
    let scale = g.scalar((d as f32).powf(-0.5));
    let mut sc = g.op("Mul", &[&sc, &scale], vec![]);
    if let Some(m) = mask {
        sc = g.op("Add", &[&sc, m], vec![]);
    }
    let pr = g.op("Softmax", &[&sc], vec![attr_i("axis", -1)]);
    let a = g.op("MatMul", &[&pr, &vv], vec![]);
    let a = g.op("Transpose", &[&a], vec![attr_ints("perm", &[0, 2, 1, 3])]);
    let shape = g.ints(&[0, 0, h as i64]);
    let a = g.op("Reshape", &[&a, &shape], vec![]);
    let r = named_linear(g, w, &a, &format!("{hp}.attention.out_proj"))?;
    let ln = g.layer_norm(
        &r,
        w.get(&format!("{hp}.layernorm.weight"))?,
        w.get(&format!("{hp}.layernorm.bias"))?,
        v.layer_norm_eps,
    )?;
    let f1 = named_linear(g, w, &ln, &format!("{hp}.mlp.fc1"))?;
    let act = g.activation(&f1, v.hidden_act);
    let f2 = named_linear(g, w, &act, &format!("{hp}.mlp.fc2"))?;
    let y = g.op("Add", &[&r, &f2], vec![]);
    let one = g.ints(&[1]);
    let y = g.op("Squeeze", &[&y, &one], vec![]);
    normalized_output(g, &y, "image_embeds", h);
    Ok(())
}

/// SigLIP's text tower: input_ids [batch, sequence], padded as its
/// tokenizer pads (to 64 for SigLIP), read without a mask and pooled at the
/// last position through the head, to L2-normalised text_embeds.
fn siglip_text(w: &Weights, c: &SiglipConfig) -> Result<ModelProto> {
    let t = &c.text_config;
    let h = t.hidden_size;
    let mut g = Graph::new();
    g.inputs.push(value_info(
        "input_ids",
        INT64,
        &[Err("batch"), Err("sequence")],
    ));
    let (mut x, _) = token_and_position(
        &mut g,
        w.get("text_model.embeddings.token_embedding.weight")?,
        w.get("text_model.embeddings.position_embedding.weight")?,
    )?;
    let one = g.ints(&[1]);
    let blk = Block {
        heads: t.num_attention_heads,
        hidden: h,
        eps: t.layer_norm_eps,
        act: t.hidden_act,
    };
    for i in 0..t.num_hidden_layers {
        x = pre_norm_block(
            &mut g,
            w,
            &format!("text_model.encoder.layers.{i}"),
            &x,
            blk,
            None,
        )?;
    }
    let minus1 = g.ints(&[-1]);
    let last = g.op("Gather", &[&x, &minus1], vec![attr_i("axis", 1)]);
    let last = g.op("Squeeze", &[&last, &one], vec![]);
    let last = g.layer_norm(
        &last,
        w.get("text_model.final_layer_norm.weight")?,
        w.get("text_model.final_layer_norm.bias")?,
        t.layer_norm_eps,
    )?;
    let y = named_linear(&mut g, w, &last, "text_model.head")?;
    normalized_output(&mut g, &y, "text_embeds", t.projection_size());
    Ok(g.finish("clasp_text"))
}

/// A BERT text tower (Chinese-CLIP's; the dual encoder's) with its
/// projection: input_ids and attention_mask [batch, sequence] (int64) to
/// L2-normalised text_embeds. Chinese-CLIP pools the [CLS] state; the dual
/// encoder its pooler (tanh), or the masked mean (`clasp_text_pooling`).
fn bert_text(
    w: &Weights,
    c: &ChineseClipConfig,
    pooling: Option<TextPooling>,
) -> Result<ModelProto> {
    let t: &BertConfig = &c.text_config;
    let h = t.hidden_size;
    let (heads, d) = (t.num_attention_heads, h / t.num_attention_heads);
    let mut g = Graph::new();
    for n in ["input_ids", "attention_mask"] {
        g.inputs
            .push(value_info(n, INT64, &[Err("batch"), Err("sequence")]));
    }
    let e = "text_model.embeddings";
    let (x, _) = token_and_position(
        &mut g,
        w.get(&format!("{e}.word_embeddings.weight"))?,
        w.get(&format!("{e}.position_embeddings.weight"))?,
    )?;
    let (z, one, two) = (g.ints(&[0]), g.ints(&[1]), g.ints(&[2]));
    let tt = g.init(
        "type0",
        &w.get(&format!("{e}.token_type_embeddings.weight"))?
            .narrow(0, 0, 1)?,
    )?;
    let x = g.op("Add", &[&x, &tt], vec![]);
    let mut x = g.layer_norm(
        &x,
        w.get(&format!("{e}.LayerNorm.weight"))?,
        w.get(&format!("{e}.LayerNorm.bias"))?,
        t.layer_norm_eps,
    )?;
    let (mf, add) = key_mask(&mut g, "attention_mask");
    for i in 0..t.num_hidden_layers {
        let p = format!("text_model.encoder.layer.{i}");
        let proj = |g: &mut Graph, n: &str| -> Result<String> {
            let y = block_linear(g, w, &x, &format!("{p}.attention.self.{n}"))?;
            let shape = g.ints(&[0, 0, heads as i64, d as i64]);
            let r = g.op("Reshape", &[&y, &shape], vec![]);
            Ok(g.op("Transpose", &[&r], vec![attr_ints("perm", &[0, 2, 1, 3])]))
        };
        let (q, k, v) = (
            proj(&mut g, "query")?,
            proj(&mut g, "key")?,
            proj(&mut g, "value")?,
        );
        let kt = g.op("Transpose", &[&k], vec![attr_ints("perm", &[0, 1, 3, 2])]);
        let s = g.op("MatMul", &[&q, &kt], vec![]);
        let scale = g.scalar((d as f32).powf(-0.5));
        let s = g.op("Mul", &[&s, &scale], vec![]);
        let s = g.op("Add", &[&s, &add], vec![]);
        let pr = g.op("Softmax", &[&s], vec![attr_i("axis", -1)]);
        let a = g.op("MatMul", &[&pr, &v], vec![]);
        let a = g.op("Transpose", &[&a], vec![attr_ints("perm", &[0, 2, 1, 3])]);
        let shape = g.ints(&[0, 0, h as i64]);
        let a = g.op("Reshape", &[&a, &shape], vec![]);
        let o = block_linear(&mut g, w, &a, &format!("{p}.attention.output.dense"))?;
        let r = g.op("Add", &[&x, &o], vec![]);
        let x1 = g.layer_norm(
            &r,
            w.get(&format!("{p}.attention.output.LayerNorm.weight"))?,
            w.get(&format!("{p}.attention.output.LayerNorm.bias"))?,
            t.layer_norm_eps,
        )?;
        let i1 = block_linear(&mut g, w, &x1, &format!("{p}.intermediate.dense"))?;
        let ac = g.activation(&i1, t.hidden_act);
        let o2 = block_linear(&mut g, w, &ac, &format!("{p}.output.dense"))?;
        let r2 = g.op("Add", &[&x1, &o2], vec![]);
        x = g.layer_norm(
            &r2,
            w.get(&format!("{p}.output.LayerNorm.weight"))?,
            w.get(&format!("{p}.output.LayerNorm.bias"))?,
            t.layer_norm_eps,
        )?;
    }
    let pooled = match pooling {
        None => {
            let first = g.op("Gather", &[&x, &z], vec![attr_i("axis", 1)]);
            g.op("Squeeze", &[&first, &one], vec![])
        }
        Some(TextPooling::Pooler) => {
            let first = g.op("Gather", &[&x, &z], vec![attr_i("axis", 1)]);
            let first = g.op("Squeeze", &[&first, &one], vec![]);
            let dn = named_linear(&mut g, w, &first, "text_model.pooler.dense")?;
            g.op("Tanh", &[&dn], vec![])
        }
        Some(TextPooling::Mean) => {
            let m3 = g.op("Unsqueeze", &[&mf, &two], vec![]); // [B, T, 1]
            let xm = g.op("Mul", &[&x, &m3], vec![]);
            let sum = g.op("ReduceSum", &[&xm, &one], vec![attr_i("keepdims", 0)]);
            let cnt = g.op("ReduceSum", &[&m3, &one], vec![attr_i("keepdims", 0)]);
            let tiny = g.scalar(1e-9);
            let cnt = g.op("Max", &[&cnt, &tiny], vec![]);
            g.op("Div", &[&sum, &cnt], vec![])
        }
    };
    let y = g.linear(&pooled, w.get("text_projection.weight")?, None)?;
    normalized_output(&mut g, &y, "text_embeds", c.projection_dim);
    Ok(g.finish("clasp_text"))
}

/// The two graphs of a model, serialised: (vision.onnx, text.onnx). With
/// `int8`, the blocks' attention and MLP linears run in int8 as
/// `--precision int8` runs them, with the given int8 weights (a quantized
/// checkpoint's, by layer name) or else the f32 ones quantized.
pub fn export(
    config: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
    path: &Path,
    int8: Option<&HashMap<String, QuantMatrix>>,
) -> Result<(Vec<u8>, Vec<u8>)> {
    let w = Weights {
        t: tensors,
        path,
        int8,
    };
    match config {
        ModelConfig::Clip(c) => Ok((
            clip_vision(&w, &c.vision_config)?.encode_to_vec(),
            clip_text(&w, c)?.encode_to_vec(),
        )),
        ModelConfig::ChineseClip(c) => Ok((
            clip_vision(&w, &c.vision_config)?.encode_to_vec(),
            bert_text(&w, c, None)?.encode_to_vec(),
        )),
        ModelConfig::DualEncoder(c) => Ok((
            clip_vision(&w, &c.vision_config)?.encode_to_vec(),
            bert_text(&w, c, Some(c.text_pooling))?.encode_to_vec(),
        )),
        ModelConfig::Siglip(c) => Ok((
            siglip_vision(&w, c)?.encode_to_vec(),
            siglip_text(&w, c)?.encode_to_vec(),
        )),
    }
}
