//! Exporting models to other runtimes' formats: ONNX (`onnx`), written with
//! hand-declared `prost` messages of ONNX's schema (`proto`).

pub mod onnx;
pub mod proto;

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;

use crate::model::loader::Layout;
use crate::model::{self, ModelConfig};
use crate::{Error, Result};

/// The files `export_onnx` writes beside the graphs.
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
];

/// The arithmetic of the exported graphs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnnxPrecision {
    F32,
    /// The transformer blocks' attention and MLP linears in dynamic int8,
    /// exactly as clasp's `--precision int8`: per-channel symmetric int8
    /// weights, per-token symmetric int8 activations, int32 products
    /// (`MatMulInteger`); everything else f32.
    Int8,
}

/// Writes `vision.onnx`, `text.onnx`, `preprocess.json` (the image
/// processor as transformers' preprocessor_config.json has it, and the text
/// context) and the tokenizer files of the model `spec` into `out`,
/// atomically. A `clasp quantize` checkpoint exports its own int8 weights
/// in int8, or their dequantized values in f32.
pub fn export_onnx(spec: &str, out: &Path, precision: OnnxPrecision) -> Result<()> {
    let files = model::resolve(spec)?;
    let mut given_int8 = HashMap::new();
    let (config, tensors, processor): (ModelConfig, HashMap<String, Tensor>, serde_json::Value) =
        match files.layout {
            Layout::OpenClip => {
                let t = model::open_clip::translate(&files.config, &files.weights)?;
                let c = ModelConfig::from_json(&t.config_json.to_string(), &files.config)?;
                (c, t.tensors, t.preprocessor_json)
            }
            Layout::Hf => {
                let c = ModelConfig::from_file(&files.config)?;
                let t = if crate::model::int8_checkpoint::is_quantized(&files.weights)? {
                    let (t, q) = crate::model::int8_checkpoint::read(&files.weights)?;
                    given_int8 = q;
                    t
                } else {
                    crate::model::loader::read_tensors(&files.weights)?
                };
                let pp = match &files.preprocessor_config {
                    Some(p) => crate::model::loader::read_json(p)?,
                    None => crate::encoder::default_image_processor(&c).to_hf_json(),
                };
                (c, t, pp)
            }
        };
    let int8 = (precision == OnnxPrecision::Int8).then_some(&given_int8);
    let (vision, text) = onnx::export(&config, &tensors, &files.weights, int8)?;
    let side = serde_json::json!({
        "model_type": config.model_type(),
        "image_processor": processor,
        "vision": {
            "input": if config.is_naflex() {
                "pixel_values (float [batch, patches, patch*patch*C], channels last), pixel_attention_mask (int64 [batch, patches]) and spatial_shapes (int64 [batch, 2]), as transformers' Siglip2ImageProcessor returns them"
            } else {
                "pixel_values (float [batch, C, S, S]), processed as image_processor says"
            },
        },
        "text": {
            "context_length": config.text_context_length(),
            "input": "input_ids (int64 [batch, sequence]), tokenized with the files beside this one",
        },
        "outputs": {"vision.onnx": "image_embeds (L2-normalised)", "text.onnx": "text_embeds (L2-normalised)"},
        "opset": onnx::OPSET,
        "precision": match precision {
            OnnxPrecision::F32 => "f32",
            OnnxPrecision::Int8 => "int8: the transformer blocks' attention and MLP linears take per-token symmetric int8 activations and per-channel symmetric int8 weights (MatMulInteger), as clasp --precision int8",
        },
    });
    crate::atomic::write_dir(out, |tmp| {
        for (name, bytes) in [("vision.onnx", &vision), ("text.onnx", &text)] {
            let p = tmp.join(name);
            std::fs::write(&p, bytes).map_err(|e| Error::io(&p, e))?;
        }
        let p = tmp.join("preprocess.json");
        let text = serde_json::to_string_pretty(&side).expect("JSON values serialise");
        std::fs::write(&p, text).map_err(|e| Error::io(&p, e))?;
        for f in TOKENIZER_FILES {
            let src = files.dir.join(f);
            if src.is_file() {
                std::fs::copy(&src, tmp.join(f)).map_err(|e| Error::io(&src, e))?;
            }
        }
        Ok(())
    })
}
