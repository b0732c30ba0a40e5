//! What the architectures share: their weights by name, the pre-norm transformer block (the one attention builder), linears, embeddings, the normalised output and the key mask.

use super::*;

/// The checkpoint's tensors by transformers' names.
pub(super) struct Weights<'a> {
    pub(super) t: &'a HashMap<String, Tensor>,
    pub(super) path: &'a Path,
    /// In int8 export, the int8 weights a quantized checkpoint holds (by
    /// layer name); the other block linears are quantized from f32.
    pub(super) int8: Option<&'a HashMap<String, QuantMatrix>>,
}

impl Weights<'_> {
    pub(super) fn get(&self, name: &str) -> Result<&Tensor> {
        self.t.get(name).ok_or_else(|| Error::Weights {
            path: self.path.to_path_buf(),
            reason: format!("missing tensor `{name}`"),
        })
    }
}

/// The shape of a tower's transformer blocks.
#[derive(Clone, Copy)]
pub(super) struct Block {
    pub(super) heads: usize,
    pub(super) hidden: usize,
    pub(super) eps: f64,
    pub(super) act: Activation,
}

/// A pre-norm transformer block (CLIP's and SigLIP's) over `x` [B, T, C],
/// with an optional additive attention mask broadcastable to [B, H, T, T].
pub(super) fn pre_norm_block(
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
pub(super) fn block_linear(g: &mut Graph, w: &Weights, x: &str, prefix: &str) -> Result<String> {
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
pub(super) fn named_linear(g: &mut Graph, w: &Weights, x: &str, prefix: &str) -> Result<String> {
    g.linear(
        x,
        w.get(&format!("{prefix}.weight"))?,
        Some(w.get(&format!("{prefix}.bias"))?),
    )
}

/// Token plus position embeddings of `input_ids` [batch, sequence] →
/// (x [B, T, C], the sequence length as a 1-element int64 tensor).
pub(super) fn token_and_position(
    g: &mut Graph,
    tok: &Tensor,
    pos: &Tensor,
) -> Result<(String, String)> {
    let te = g.init("tok", tok)?;
    let t = g.op("Gather", &[&te, "input_ids"], vec![attr_i("axis", 0)]);
    let shp = g.op("Shape", &["input_ids"], vec![]);
    let (z, one, two) = (g.ints(&[0]), g.ints(&[1]), g.ints(&[2]));
    let seq = g.op("Slice", &[&shp, &one, &two], vec![]);
    let pe = g.init("pos", pos)?;
    let p = g.op("Slice", &[&pe, &z, &seq, &z], vec![]);
    Ok((g.op("Add", &[&t, &p], vec![]), seq))
}

/// `x` [B, C] L2-normalised into the graph output `name` [B, dim].
pub(super) fn normalized_output(g: &mut Graph, x: &str, name: &str, dim: usize) {
    g.op(
        "LpNormalization",
        &[x],
        vec![attr_i("axis", -1), attr_i("p", 2)],
    );
    g.nodes.last_mut().expect("just pushed").output = vec![name.into()];
    g.outputs
        .push(value_info(name, FLOAT, &[Err("batch"), Ok(dim as i64)]));
}

/// The int64 [B, T] mask input `name` as f32 [B, T], and as the additive
/// key mask [B, 1, 1, T] that transformers builds: padding keys get the
/// lowest f32 added.
pub(super) fn key_mask(g: &mut Graph, name: &str) -> (String, String) {
    let mf = g.op("Cast", &[name], vec![attr_i("to", FLOAT as i64)]);
    let onef = g.scalar(1.0);
    let inv = g.op("Sub", &[&onef, &mf], vec![]);
    let low = g.scalar(f32::MIN);
    let add = g.op("Mul", &[&inv, &low], vec![]);
    let axes = g.ints(&[1, 2]);
    let add = g.op("Unsqueeze", &[&add, &axes], vec![]);
    (mf, add)
}
