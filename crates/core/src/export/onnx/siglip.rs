//! SigLIP's towers, and SigLIP 2's NaFlex vision tower (positions resized in the graph from spatial_shapes).

use super::*;

/// SigLIP's image tower with its attention-pooling head: pixel_values
/// [batch, C, S, S] to L2-normalised image_embeds [batch, C].
pub(super) fn siglip_vision(w: &Weights, c: &SiglipConfig) -> Result<ModelProto> {
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

/// SigLIP 2's image tower, NaFlex: transformers' inputs (pixel_values
/// [batch, N, p*p*C] patches, channels last; pixel_attention_mask [batch, N];
/// spatial_shapes [batch, 2], each image's patch grid) to L2-normalised
/// image_embeds. Each image's positions are the [g, g] table resized to its
/// grid by antialiased bilinear weights (torch's, `align_corners=False`),
/// computed in the graph from its grid, so one batch mixes aspect ratios.
pub(super) fn siglip2_vision(w: &Weights, c: &SiglipConfig, n_table: usize) -> Result<ModelProto> {
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
pub(super) fn siglip_vision_rest(
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
pub(super) fn siglip_text(w: &Weights, c: &SiglipConfig) -> Result<ModelProto> {
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
