//! BLIP-2's image–text retrieval model (transformers'
//! `Blip2ForImageTextRetrieval`, model type `blip-2`): its ViT
//! (`Blip2VisionModel`), the Q-Former with its ITC and ITM heads
//! ([`super::qformer`]), the BLIP image processor and the Q-Former's BERT
//! tokenizer. It is a *fusion* model: its ITM head looks at an image and a
//! text together, which is what re-ranking a retrieval's top hits needs.
//!
//! `Blip2VisionModel` differs from CLIP's ViT in four ways, handled here by
//! building a [`VisionTransformer`] from its parts: the patch convolution has
//! a bias, there is no pre-LayerNorm, attention is one fused `qkv` whose bias
//! is (q_bias, 0, v_bias), and its output is the post-LayerNorm of every
//! token (the Q-Former reads them all).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::cnn_tower::{parse_vision_config, CnnConfig, CnnTower};
use super::config::{Activation, VisionConfig};
use super::layers::{Attention, LayerNorm, Linear, Mlp, PreNormBlock};
use super::loader::read_json;
use super::qformer::{QFormerConfig, QFormerHeads};
use super::vit::VisionTransformer;
use crate::preprocess::{ImageProcessor, ImageProcessorConfig, Pixels, TextTokenizer};
use crate::{Error, Result};

/// transformers' `Blip2VisionConfig`, with its defaults (EVA ViT-g/14).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Blip2VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    pub qkv_bias: bool,
}

impl Default for Blip2VisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 1408,
            intermediate_size: 6144,
            num_hidden_layers: 39,
            num_attention_heads: 16,
            image_size: 224,
            patch_size: 14,
            hidden_act: Activation::Gelu,
            layer_norm_eps: 1e-6,
            qkv_bias: true,
        }
    }
}

impl Blip2VisionConfig {
    /// The ViT's sizes as clasp's CLIP-family vision config (which
    /// [`load_vision`] builds the tower with).
    pub fn vision_config(&self) -> VisionConfig {
        VisionConfig {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_channels: 3,
            image_size: self.image_size,
            patch_size: self.patch_size,
            hidden_act: self.hidden_act,
            layer_norm_eps: self.layer_norm_eps,
            projection_dim: self.hidden_size,
        }
    }

    /// The config as transformers writes it (`blip_2_vision_model`).
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("a config serialises");
        v["model_type"] = serde_json::json!("blip_2_vision_model");
        v
    }
}

/// transformers' `Blip2Config`: the parts a retrieval model reads.
#[derive(Clone, Debug, Deserialize)]
pub struct Blip2Config {
    #[serde(default)]
    pub vision_config: Blip2VisionConfig,
    pub qformer_config: QFormerConfig,
    #[serde(default = "d_queries")]
    pub num_query_tokens: usize,
    #[serde(default = "d_itc")]
    pub image_text_hidden_size: usize,
    #[serde(default)]
    pub image_token_index: Option<u32>,
    /// A pretrained CNN under the Q-Former (clasp's: a `vision_config` whose
    /// `model_type` names a CNN tower, its `vision_model.*` the tower's
    /// tensors in their own names); `None` for `Blip2VisionModel`.
    #[serde(skip)]
    pub cnn: Option<CnnConfig>,
}

fn d_queries() -> usize {
    32
}
fn d_itc() -> usize {
    256
}

impl Blip2Config {
    pub fn from_file(path: &Path) -> Result<Self> {
        let v = read_json(path)?;
        if v["model_type"] != "blip-2" {
            return Err(Error::Config {
                path: path.to_path_buf(),
                reason: format!("model_type {} is not blip-2", v["model_type"]),
            });
        }
        let cnn = parse_vision_config(&v["vision_config"])
            .transpose()
            .map_err(|reason| Error::Config {
                path: path.to_path_buf(),
                reason: format!("vision_config: {reason}"),
            })?;
        let mut v = v;
        if cnn.is_some() {
            // A CNN's keys are not Blip2VisionConfig's.
            v["vision_config"] = serde_json::json!({});
        }
        let mut cfg: Self = serde_json::from_value(v).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        if let Some((cnn, vit)) = cnn {
            cfg.vision_config.hidden_size = vit.hidden_size;
            cfg.vision_config.image_size = vit.image_size;
            cfg.cnn = Some(cnn);
        }
        // As Blip2Config does: the queries read the vision tower's width.
        cfg.qformer_config.encoder_hidden_size = cfg.vision_config.hidden_size;
        Ok(cfg)
    }
}

/// `BlipImageProcessor`'s preprocessor_config.json for `cfg` (a resize to
/// a square, no crop), or an error when `cfg` does otherwise.
pub fn blip_processor_json(cfg: &ImageProcessorConfig) -> Result<serde_json::Value> {
    let mut v = cfg.to_hf_json();
    if v["do_center_crop"] == true || v["size"].get("height").is_none() {
        return Err(Error::Report(
            "BLIP-2's image processor resizes to a square without cropping; this model's \
             preprocessing does otherwise"
                .into(),
        ));
    }
    let o = v.as_object_mut().expect("an object");
    o.remove("do_center_crop");
    o.remove("crop_size");
    o.insert("image_processor_type".into(), "BlipImageProcessor".into());
    Ok(v)
}

/// `Blip2VisionModel` (`vb` at `vision_model`) as a [`VisionTransformer`].
pub fn load_vision(vb: VarBuilder, cfg: &Blip2VisionConfig) -> Result<VisionTransformer> {
    let (h, p) = (cfg.hidden_size, cfg.patch_size);
    if !cfg.image_size.is_multiple_of(p) || !h.is_multiple_of(cfg.num_attention_heads) {
        return Err(Error::Shape(format!(
            "Blip2 vision config: image_size {} and patch_size {p}, hidden {h} and {} heads do not fit",
            cfg.image_size, cfg.num_attention_heads
        )));
    }
    let emb = vb.pp("embeddings");
    let n_pos = (cfg.image_size / p).pow(2) + 1;
    let conv = emb.get((h, 3, p, p), "patch_embedding.weight")?;
    let patch = Linear::new(
        conv.reshape((h, 3 * p * p))?,
        Some(emb.get(h, "patch_embedding.bias")?),
    );
    let class = emb.get((1, 1, h), "class_embedding")?.reshape(h)?;
    let positions = emb
        .get((1, n_pos, h), "position_embedding")?
        .reshape((n_pos, h))?;
    let enc = vb.pp("encoder.layers");
    let layers = (0..cfg.num_hidden_layers)
        .map(|i| layer(enc.pp(i), cfg))
        .collect::<Result<Vec<_>>>()?;
    let post = LayerNorm::load(vb.pp("post_layernorm"), h, cfg.layer_norm_eps)?;
    VisionTransformer::from_parts(
        patch,
        class,
        positions,
        None,
        layers,
        post,
        cfg.vision_config(),
    )
}

/// One `Blip2EncoderLayer`: the fused qkv split into CLIP's q, k and v.
fn layer(vb: VarBuilder, cfg: &Blip2VisionConfig) -> Result<PreNormBlock> {
    let (h, i, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
    let a = vb.pp("self_attn");
    let w = a.get((3 * h, h), "qkv.weight")?;
    // transformers 5 keeps one `qkv.bias` (q, k, v); checkpoints saved
    // before it keep `q_bias` and `v_bias`, the key bias being zero.
    let bias = if !cfg.qkv_bias {
        None
    } else if a.contains_tensor("qkv.bias") {
        Some(a.get(3 * h, "qkv.bias")?)
    } else {
        let q = a.get(h, "q_bias")?;
        let v = a.get(h, "v_bias")?;
        Some(Tensor::cat(&[&q, &q.zeros_like()?, &v], 0)?)
    };
    let part = |k: usize| -> Result<Linear> {
        Ok(Linear::new(
            w.narrow(0, k * h, h)?,
            bias.as_ref().map(|b| b.narrow(0, k * h, h)).transpose()?,
        ))
    };
    let attn = Attention::new(
        part(0)?,
        part(1)?,
        part(2)?,
        Linear::load(a.pp("projection"), h, h, true)?,
        cfg.num_attention_heads,
    )?;
    let mlp = Mlp::new(
        Linear::load(vb.pp("mlp.fc1"), h, i, true)?,
        Linear::load(vb.pp("mlp.fc2"), i, h, true)?,
        cfg.hidden_act,
    );
    Ok(PreNormBlock::new(
        LayerNorm::load(vb.pp("layer_norm1"), h, eps)?,
        attn,
        LayerNorm::load(vb.pp("layer_norm2"), h, eps)?,
        mlp,
    ))
}

/// Re-ranking with the ITM head (`--rerank`): a retrieval's top candidates
/// re-scored by the fusion model.
/// - `itm`: ordered by the ITM head's match probability (softmax over its two
///   logits, as transformers' examples report it);
/// - `itm+sim`: by the match logit plus the first stage's similarity, as
///   ALBEF, BLIP and LAVIS's BLIP-2 retrieval score re-ranked candidates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RerankScore {
    Itm,
    ItmPlusSim,
}

/// `--rerank itm[:K]` or `itm+sim[:K]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rerank {
    pub score: RerankScore,
    /// How many first-stage hits are re-scored (at least the results asked for).
    pub candidates: usize,
}

/// The candidates re-scored when `:K` is not given.
pub const DEFAULT_CANDIDATES: usize = 32;

impl RerankScore {
    /// The match probability of ITM logits (no match, match) and the key
    /// the hit is ordered by, given the first stage's similarity `sim`.
    pub fn score(self, logits: [f32; 2], sim: f64) -> (f64, f64) {
        let (no, yes) = (logits[0] as f64, logits[1] as f64);
        let prob = 1.0 / (1.0 + (no - yes).exp());
        match self {
            RerankScore::Itm => (prob, prob),
            RerankScore::ItmPlusSim => (prob, yes + sim),
        }
    }
}

impl std::str::FromStr for Rerank {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (name, k) = match s.split_once(':') {
            Some((n, k)) => (n, Some(k)),
            None => (s, None),
        };
        let score = match name {
            "itm" => RerankScore::Itm,
            "itm+sim" => RerankScore::ItmPlusSim,
            _ => {
                return Err(format!(
                    "unknown re-ranker `{name}`: itm[:K] or itm+sim[:K]"
                ))
            }
        };
        let candidates = match k {
            Some(k) => k
                .parse::<usize>()
                .ok()
                .filter(|&k| k > 0)
                .ok_or_else(|| format!("`{k}` is not a number of candidates (itm:32)"))?,
            None => DEFAULT_CANDIDATES,
        };
        Ok(Self { score, candidates })
    }
}

/// The image tower under the Q-Former: BLIP-2's ViT, whose every token
/// (after the post-LayerNorm) the queries read, or a pretrained CNN, whose
/// last feature map's positions they read (MobileNetV2: 49 of 1280).
#[derive(Debug, Clone)]
pub enum Blip2Tower {
    Vit(Box<VisionTransformer>),
    Cnn(Box<CnnTower>),
}

impl Blip2Tower {
    /// The tower of `cfg` from `vb` at `vision_model`.
    pub fn load(vb: VarBuilder, cfg: &Blip2Config) -> Result<Self> {
        Ok(match &cfg.cnn {
            Some(c) => Blip2Tower::Cnn(Box::new(CnnTower::load(vb, c)?)),
            None => Blip2Tower::Vit(Box::new(load_vision(vb, &cfg.vision_config)?)),
        })
    }

    /// The tokens the Q-Former reads, [B, P, width], without a graph.
    pub fn features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let _no_grad = super::grad_mode_guard(false);
        Ok(match self {
            Blip2Tower::Vit(v) => v.last_hidden_state(pixel_values)?,
            Blip2Tower::Cnn(c) => c.feature_tokens(pixel_values)?,
        }
        .detach())
    }
}

/// A `Blip2ForImageTextRetrieval` folder, loaded.
pub struct Blip2Retrieval {
    pub vision: Blip2Tower,
    pub heads: QFormerHeads,
    pub processor: ImageProcessor,
    pub tokenizer: TextTokenizer,
    pub cfg: Blip2Config,
    /// The folder it was loaded from.
    pub dir: PathBuf,
    device: Device,
}

/// Whether `dir` holds a BLIP-2 checkpoint (config.json `model_type` "blip-2").
pub fn is_blip2_dir(dir: &Path) -> bool {
    read_json(&dir.join("config.json")).is_ok_and(|c| c["model_type"] == "blip-2")
}

impl Blip2Retrieval {
    /// Reads config.json, model.safetensors, preprocessor_config.json (the
    /// BLIP processor's defaults at the tower's size when absent) and the
    /// tokenizer files.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg = Blip2Config::from_file(&dir.join("config.json"))?;
        let weights = dir.join("model.safetensors");
        if !weights.is_file() {
            return Err(Error::Report(format!(
                "{}: no model.safetensors (a Blip2ForImageTextRetrieval folder holds one)",
                dir.display()
            )));
        }
        // SAFETY: the file is mapped read-only and not modified while the
        // model lives; candle checks every tensor's bounds against the map.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device)? };
        // The queries' cross-attention must read the tower's width.
        let key = "qformer.encoder.layer.0.crossattention.attention.key.weight";
        if vb.contains_tensor(key) {
            let reads = vb.get_unchecked(key)?.dim(1)?;
            let gives = cfg.qformer_config.encoder_hidden_size;
            if reads != gives {
                return Err(Error::Shape(format!(
                    "{}: the Q-Former's queries read {reads}-wide image tokens ({key}), but its \
                     vision tower gives {gives}: the checkpoint's Q-Former does not fit its tower",
                    weights.display()
                )));
            }
        }
        let vision = Blip2Tower::load(vb.pp("vision_model"), &cfg)?;
        let heads = QFormerHeads::load(
            vb.clone(),
            &cfg.qformer_config,
            cfg.num_query_tokens,
            cfg.image_text_hidden_size,
        )?;
        let pp = dir.join("preprocessor_config.json");
        let processor = ImageProcessor::new(if pp.is_file() {
            ImageProcessorConfig::from_file(&pp)?
        } else if let Some(cnn) = &cfg.cnn {
            cnn.processor()
        } else {
            // BlipImageProcessor's rule, which is Chinese-CLIP's.
            ImageProcessorConfig::chinese_clip_default(cfg.vision_config.image_size as u32)
        });
        let context = cfg.qformer_config.max_position_embeddings;
        let tokenizer = TextTokenizer::from_dir(dir, context)?;
        Ok(Self {
            vision,
            heads,
            processor,
            tokenizer,
            cfg,
            dir: dir.to_path_buf(),
            device: device.clone(),
        })
    }

    /// A BLAKE3 hash of the folder's content (config, weights, image
    /// processor and tokenizer files), as [`crate::Encoder::content_hash`]
    /// keys a dual encoder's vectors.
    pub fn content_hash(&self) -> Result<[u8; 32]> {
        let mut h = blake3::Hasher::new();
        h.update(b"blip-2 itc:");
        let (config, weights) = (
            self.dir.join("config.json"),
            self.dir.join("model.safetensors"),
        );
        let pp = self.dir.join("preprocessor_config.json");
        let mut files = vec![config.as_path(), weights.as_path()];
        if pp.is_file() {
            files.push(&pp);
        }
        crate::encoder::hash_model_files(&mut h, &files, &self.dir)?;
        Ok(*h.finalize().as_bytes())
    }

    /// The ITC width D: one text's embedding, and each query's.
    pub fn itc_dim(&self) -> usize {
        self.cfg.image_text_hidden_size
    }

    /// The ITC embeddings of processed images, each its N queries'
    /// L2-normalised embeddings back to back (N·D values): what an index
    /// stores for an image, scored against a text by the best query
    /// ([`QFormerHeads::itc`]).
    pub fn embed_image_queries(&self, items: &[Pixels]) -> Result<Vec<Vec<f32>>> {
        let side = self.cfg.vision_config.image_size;
        for (i, p) in items.iter().enumerate() {
            if (p.height, p.width) != (side, side) || p.data.len() != 3 * side * side {
                return Err(Error::Shape(format!(
                    "image {i} is {}x{} after preprocessing; BLIP-2 reads {side}x{side}",
                    p.height, p.width
                )));
            }
        }
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let flat: Vec<f32> = items.iter().flat_map(|p| p.data.iter().copied()).collect();
        let px = Tensor::from_vec(flat, (items.len(), 3, side, side), &self.device)?;
        let _no_grad = super::grad_mode_guard(false);
        let q = self.heads.image_embeds(&self.image_features(&px)?)?;
        Ok(q.flatten_from(1)?.to_vec2()?)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The vision tower's output for pixels [B, 3, S, S] that the Q-Former
    /// reads: the ViT's every token after the post-LayerNorm, [B, 1 +
    /// patches, width], or a CNN's feature map positions [B, H·W, C].
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.vision.features(pixel_values)
    }

    /// Token ids [B, L] and their 0/1 mask (f32) for texts.
    fn tokens(&self, texts: &[String]) -> Result<(Tensor, Tensor)> {
        let (ids, mask) = self
            .tokenizer
            .encode(texts)?
            .to_tensors(true, &self.device)?;
        Ok((ids.to_dtype(DType::U32)?, mask.to_dtype(DType::F32)?))
    }

    /// The ITC embeddings of texts [T, D], L2-normalised.
    pub fn text_embeds(&self, texts: &[String]) -> Result<Tensor> {
        let (ids, mask) = self.tokens(texts)?;
        self.heads.text_embeds(&ids, &mask)
    }

    /// The ITM logits [T, 2] (no match, match) of one image's features
    /// [1, P, E] with each text.
    pub fn itm_logits(&self, image_features: &Tensor, texts: &[String]) -> Result<Tensor> {
        let (ids, mask) = self.tokens(texts)?;
        let (_, p, e) = image_features.dims3()?;
        let img = image_features
            .broadcast_as((texts.len(), p, e))?
            .contiguous()?;
        self.heads.itm(&img, &ids, &mask)
    }

    /// The ITM logits (no match, match) of one text with each of several
    /// images, given as the processor's pixels ([3, S, S] each).
    pub fn itm_logits_pixels(&self, pixels: &[Vec<f32>], text: &str) -> Result<Vec<[f32; 2]>> {
        let n = pixels.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let side = self.cfg.vision_config.image_size;
        let batch = Tensor::from_vec(pixels.concat(), (n, 3, side, side), &self.device)?;
        self.itm_logits_features(&self.image_features(&batch)?, text)
    }

    /// The ITM logits (no match, match) of one text with each of several
    /// images' features [n, P, E].
    pub fn itm_logits_features(&self, feats: &Tensor, text: &str) -> Result<Vec<[f32; 2]>> {
        let n = feats.dim(0)?;
        let (ids, mask) = self.tokens(&[text.to_string()])?;
        let ids = ids.broadcast_as((n, ids.dim(1)?))?.contiguous()?;
        let mask = mask.broadcast_as((n, mask.dim(1)?))?.contiguous()?;
        let logits: Vec<Vec<f32>> = self.heads.itm(feats, &ids, &mask)?.to_vec2()?;
        Ok(logits.into_iter().map(|l| [l[0], l[1]]).collect())
    }

    /// The probability that each text matches the image (softmax over the
    /// ITM logits, the "match" column), as BLIP-2's examples report it.
    pub fn itm_scores(&self, image_features: &Tensor, texts: &[String]) -> Result<Vec<f32>> {
        let logits = self.itm_logits(image_features, texts)?;
        let probs = candle_nn::ops::softmax(&logits, D::Minus1)?;
        Ok(probs.narrow(1, 1, 1)?.squeeze(1)?.to_vec1()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_rerank_option() {
        let r: Rerank = "itm".parse().unwrap();
        assert_eq!(
            (r.score, r.candidates),
            (RerankScore::Itm, DEFAULT_CANDIDATES)
        );
        let r: Rerank = "itm+sim:128".parse().unwrap();
        assert_eq!((r.score, r.candidates), (RerankScore::ItmPlusSim, 128));
        assert!("itm:0".parse::<Rerank>().unwrap_err().contains("`0`"));
        assert!("cosine".parse::<Rerank>().unwrap_err().contains("`cosine`"));
    }
}
