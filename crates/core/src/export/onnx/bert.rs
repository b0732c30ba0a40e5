//! The BERT text tower (Chinese-CLIP, VisionTextDualEncoder).

use super::*;

/// A BERT text tower (Chinese-CLIP's; the dual encoder's) with its
/// projection: input_ids and attention_mask [batch, sequence] (int64) to
/// L2-normalised text_embeds. Chinese-CLIP pools the [CLS] state; the dual
/// encoder its pooler (tanh), or the masked mean (`clasp_text_pooling`).
pub(super) fn bert_text(
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
