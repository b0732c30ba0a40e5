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

mod graph;
use graph::*;
mod blocks;
use blocks::*;
mod clip;
use clip::*;
mod siglip;
use siglip::*;
mod bert;
use bert::*;

pub const OPSET: i64 = 17;

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
        ModelConfig::Clip(c) if c.image_cnn.is_some() => Err(crate::Error::Report(
            "ONNX export of a CLIP with a ResNet image tower (open_clip's RN50 family) is not \
             implemented yet (only ViT towers export)"
                .into(),
        )),
        ModelConfig::Clip(c) => Ok((
            clip_vision(&w, &c.vision_config)?.encode_to_vec(),
            clip_text(&w, c)?.encode_to_vec(),
        )),
        ModelConfig::ChineseClip(c) => Ok((
            clip_vision(&w, &c.vision_config)?.encode_to_vec(),
            bert_text(&w, c, None)?.encode_to_vec(),
        )),
        ModelConfig::DualEncoder(c) if c.image_cnn.is_some() => Err(crate::Error::Report(
            "ONNX export of a dual encoder with a CNN image tower is not implemented yet \
             (only ViT towers export)"
                .into(),
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
