//! Writing the model as transformers' `LlamaForCausalLM`: its tensors by transformers' names and its config.

use super::*;

impl Llama {
    /// The projection weights as f32 tensors in Hugging Face's names and
    /// layout (q and k rows back in rotate-half order), for saving a
    /// `LlamaForCausalLM` checkpoint.
    pub fn hf_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let c = &self.cfg;
        let dense = |m: &Linear| m.dense(&self.device);
        let unpermute = |w: Tensor, heads: usize| -> Result<Tensor> {
            match c.rope_layout {
                RopeLayout::Half => Ok(w),
                RopeLayout::Interleaved => interleaved_to_half_rows(&w, heads),
            }
        };
        let mut out = Vec::new();
        let embed = match &self.embed {
            Embedding::Quantized(q) => q.dequantize(&self.device)?,
            Embedding::Q8_0(w) => {
                Tensor::from_vec(w.dequantize(), (w.rows(), w.cols()), &self.device)?
            }
            Embedding::F32(w) => w.clone(),
        };
        out.push(("model.embed_tokens.weight".to_string(), embed));
        for (i, b) in self.blocks.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.input_layernorm.weight"), b.attn_norm.clone()));
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                b.ffn_norm.clone(),
            ));
            let qkv = b.qkv.dense(&self.device)?;
            let q = unpermute(qkv[0].clone(), c.num_heads)?;
            out.push((format!("{p}.self_attn.q_proj.weight"), q));
            let k = unpermute(qkv[1].clone(), c.num_kv_heads)?;
            out.push((format!("{p}.self_attn.k_proj.weight"), k));
            out.push((format!("{p}.self_attn.v_proj.weight"), qkv[2].clone()));
            out.push((format!("{p}.self_attn.o_proj.weight"), dense(&b.o)?));
            let gu = b.gate_up.dense(&self.device)?;
            out.push((format!("{p}.mlp.gate_proj.weight"), gu[0].clone()));
            out.push((format!("{p}.mlp.up_proj.weight"), gu[1].clone()));
            out.push((format!("{p}.mlp.down_proj.weight"), dense(&b.down)?));
        }
        out.push(("model.norm.weight".to_string(), self.norm.clone()));
        if !c.tie_word_embeddings {
            out.push((
                "lm_head.weight".to_string(),
                self.lm_head.dense(&self.device)?,
            ));
        }
        Ok(out)
    }

    /// The `LlamaForCausalLM` config.json that matches `hf_tensors`.
    pub fn hf_config(&self, bos: Option<u32>, eos: Option<u32>) -> serde_json::Value {
        let c = &self.cfg;
        let scaling = if c.rope_linear_factor != 1.0 {
            serde_json::json!({"rope_type": "linear", "factor": c.rope_linear_factor})
        } else {
            serde_json::Value::Null
        };
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_layers,
            "num_attention_heads": c.num_heads,
            "num_key_value_heads": c.num_kv_heads,
            "head_dim": c.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": c.rms_norm_eps,
            "rope_theta": c.rope_theta,
            "rope_scaling": scaling,
            "max_position_embeddings": c.max_position_embeddings,
            "tie_word_embeddings": c.tie_word_embeddings,
            "attention_bias": false,
            "mlp_bias": false,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "torch_dtype": "float32",
        })
    }

    /// The storage type of the projections (for reports).
    pub fn weight_type(&self) -> Option<GgmlDType> {
        match &self.blocks.first()?.o {
            Linear::Candle(QMatMul::QTensor(q)) => Some(q.dtype()),
            Linear::Q4_1(..) => Some(GgmlDType::Q4_1),
            Linear::Q8_0(..) => Some(GgmlDType::Q8_0),
            _ => Some(GgmlDType::F32),
        }
    }
}
