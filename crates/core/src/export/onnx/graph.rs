//! The graph builder: nodes, initializers (f32 and int8), attributes and the ops every architecture composes.

use super::*;

/// A graph under construction: nodes in order, initializers by name.
pub(super) struct Graph {
    pub(super) nodes: Vec<NodeProto>,
    pub(super) inits: Vec<TensorProto>,
    pub(super) inputs: Vec<ValueInfoProto>,
    pub(super) outputs: Vec<ValueInfoProto>,
    pub(super) n: usize,
}

pub(super) fn attr_i(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        i,
        r#type: ATTR_INT,
        ..Default::default()
    }
}

pub(super) fn attr_f(name: &str, f: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        f,
        r#type: ATTR_FLOAT,
        ..Default::default()
    }
}

pub(super) fn attr_ints(name: &str, ints: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        ints: ints.to_vec(),
        r#type: ATTR_INTS,
        ..Default::default()
    }
}

pub(super) fn value_info(name: &str, elem: i32, dims: &[Result<i64, &str>]) -> ValueInfoProto {
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
    pub(super) fn new() -> Self {
        Self {
            nodes: Vec::new(),
            inits: Vec::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            n: 0,
        }
    }

    pub(super) fn fresh(&mut self, hint: &str) -> String {
        self.n += 1;
        format!("{hint}_{}", self.n)
    }

    /// An f32 initializer from a tensor.
    pub(super) fn init(&mut self, hint: &str, t: &Tensor) -> Result<String> {
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

    pub(super) fn scalar(&mut self, v: f32) -> String {
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
    pub(super) fn int_scalar(&mut self, v: i64) -> String {
        let name = self.fresh("k");
        self.inits.push(TensorProto {
            dims: vec![],
            data_type: INT64,
            name: name.clone(),
            raw_data: v.to_le_bytes().to_vec(),
        });
        name
    }

    pub(super) fn ints(&mut self, v: &[i64]) -> String {
        let name = self.fresh("i");
        self.inits.push(TensorProto {
            dims: vec![v.len() as i64],
            data_type: INT64,
            name: name.clone(),
            raw_data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        });
        name
    }

    pub(super) fn op(
        &mut self,
        op: &str,
        inputs: &[&str],
        attribute: Vec<AttributeProto>,
    ) -> String {
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
    pub(super) fn linear(&mut self, x: &str, w: &Tensor, b: Option<&Tensor>) -> Result<String> {
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
    pub(super) fn linear_int8(
        &mut self,
        x: &str,
        q: &QuantMatrix,
        b: Option<&Tensor>,
    ) -> Result<String> {
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

    pub(super) fn layer_norm(
        &mut self,
        x: &str,
        w: &Tensor,
        b: &Tensor,
        eps: f64,
    ) -> Result<String> {
        let (w, b) = (self.init("ln_w", w)?, self.init("ln_b", b)?);
        Ok(self.op(
            "LayerNormalization",
            &[x, &w, &b],
            vec![attr_i("axis", -1), attr_f("epsilon", eps as f32)],
        ))
    }

    pub(super) fn activation(&mut self, x: &str, act: Activation) -> String {
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

    pub(super) fn finish(self, name: &str) -> ModelProto {
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
