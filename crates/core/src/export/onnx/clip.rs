//! CLIP's vision and text towers.

use super::*;

/// CLIP's image tower with its projection: pixel_values [batch, C, S, S]
/// to L2-normalised image_embeds [batch, P].
pub(super) fn clip_vision(w: &Weights, v: &VisionConfig) -> Result<ModelProto> {
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
pub(super) fn clip_text(w: &Weights, cfg: &ClipConfig) -> Result<ModelProto> {
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
