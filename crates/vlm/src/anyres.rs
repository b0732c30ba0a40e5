//! LLaVA-NeXT's AnyRes on the model side (`LlavaNextForConditionalGeneration`):
//! [`pack`] lays the features of an image's base picture and tiles
//! ([`clasp_core::preprocess::anyres::tiles`]) out as one sequence, as
//! transformers' `LlavaNextModel.pack_image_features` does: the base
//! picture's tokens, then the tiles' feature map (tile rows and columns laid
//! out as the picture) with the padding the aspect left cut away
//! (`unpad_image`), one `image_newline` after each row. The `impl Vlm` below
//! makes a model tile its images ([`Vlm::set_anyres`]), counts and expands
//! each image's tokens by its size, and reads and writes the config fields.

use candle_core::{Tensor, D};

use crate::{Error, Result};
use clasp_core::preprocess::anyres::unpadded_size;

/// Packs `feats` [1 + rows·cols, p·p, hidden] (the base picture's tokens,
/// then each tile's, row by row; a tile's tokens row-major p×p) of an image
/// whose original size is `image_size` (height, width), with `newline`
/// [hidden] after each row of the map. Returns [tokens, hidden].
pub fn pack(
    feats: &Tensor,
    grid: (usize, usize),
    image_size: (u32, u32),
    newline: Option<&Tensor>,
) -> Result<Tensor> {
    let (n, pp, hidden) = feats.dims3()?;
    let p = (pp as f64).sqrt().round() as usize;
    if p * p != pp || n != 1 + grid.0 * grid.1 {
        return Err(Error::Shape(format!(
            "AnyRes features: {n} pictures of {pp} tokens for a {}x{} grid of square tiles",
            grid.0, grid.1
        )));
    }
    let base = feats.get(0)?;
    if n == 1 {
        return Ok(match newline {
            Some(nl) => Tensor::cat(&[&base, &nl.unsqueeze(0)?], 0)?,
            None => base,
        });
    }
    let (rows, cols) = grid;
    // (R, C, p, p, H) -> (R, p, C, p, H) -> the map (R·p, C·p, H).
    let map = feats
        .narrow(0, 1, rows * cols)?
        .reshape((rows, cols, p, p, hidden))?
        .permute((0, 2, 1, 3, 4))?
        .reshape((rows * p, cols * p, hidden))?;
    let (full_h, full_w) = (rows * p, cols * p);
    let (h, w) = unpadded_size(image_size, grid, p);
    let map = map
        .narrow(0, (full_h - h) / 2, h)?
        .narrow(1, (full_w - w) / 2, w)?;
    let map = match newline {
        Some(nl) => {
            let col = nl.reshape((1, 1, hidden))?.broadcast_as((h, 1, hidden))?;
            Tensor::cat(&[&map, &col.contiguous()?], D::Minus2)?
        }
        None => map,
    };
    let width = map.dim(1)?;
    let flat = map.contiguous()?.reshape((h * width, hidden))?;
    Ok(Tensor::cat(&[&base, &flat], 0)?)
}

use clasp_core::preprocess::anyres::{check_pinpoints, feature_count, tiles, AnyResPixels};

use crate::connector::ConnectorKind;
use crate::model::{FeatureSelect, Vlm};

/// A LLaVA-NeXT model's image tiling ([`Vlm::tiler`]): its grid
/// pinpoints, tile size and tile processor.
#[derive(Debug, Clone)]
pub struct Tiler {
    pinpoints: Vec<(u32, u32)>,
    side: u32,
    processor: clasp_core::preprocess::ImageProcessor,
}

impl Tiler {
    /// `img`'s base picture and tiles, prepared for the tower.
    pub fn tile(&self, img: &image::RgbImage) -> Result<AnyResPixels> {
        tiles(&self.processor, img, &self.pinpoints, self.side)
    }
}

impl Vlm {
    /// The grid pinpoints (height, width) when the model is LLaVA-NeXT's
    /// (`LlavaNextForConditionalGeneration`).
    pub fn anyres(&self) -> Option<&[(u32, u32)]> {
        self.cfg.anyres.as_deref()
    }

    /// Makes the model LLaVA-NeXT's: images tiled at the best of
    /// `pinpoints` (multiples of the tower's size) plus the base image, and
    /// `image_newline` ([hidden]; a fresh one, N(0, 1/hidden) from `seed`,
    /// as transformers initialises it, when `None`) after each row of the
    /// tiles' map. The tower must be CLIP's ViT and the connector one token
    /// per patch (mlp2x_gelu), so the tiles' tokens form a map.
    pub fn set_anyres(
        &mut self,
        pinpoints: Vec<(u32, u32)>,
        newline: Option<Tensor>,
        seed: u64,
    ) -> Result<()> {
        if self.blip2_vision().is_some() {
            return Err(Error::Report(
                "AnyRes tiles a patch map: BLIP-2's tower feeds a Q-Former, whose queries are not one"
                    .into(),
            ));
        }
        if self.cfg.select != FeatureSelect::Default {
            return Err(Error::Report(
                "AnyRes packs the patch tokens without the class token (vision_feature_select_strategy \"default\"), as transformers requires".into(),
            ));
        }
        if !matches!(self.cfg.connector, ConnectorKind::Mlp2xGelu) {
            return Err(Error::Report(
                "AnyRes lays the connector's tokens out as the patch map: it needs the \
                 mlp2x_gelu connector (one token per patch)"
                    .into(),
            ));
        }
        let side = self.vision_cfg.image_size as u32;
        check_pinpoints(&pinpoints, side)?;
        let hidden = self.llm.config().hidden_size;
        let newline = match newline {
            Some(t) => {
                if t.dims() != [hidden] {
                    return Err(Error::Shape(format!(
                        "image_newline is {:?}, the language model {hidden} wide",
                        t.dims()
                    )));
                }
                t
            }
            None => {
                let mut rng = crate::rng::Rng(seed ^ 0x4E_E75_11E);
                let v = rng.normal(hidden, 1.0 / (hidden as f64).sqrt());
                Tensor::from_vec(v, hidden, self.device())?
            }
        };
        self.cfg.anyres = Some(pinpoints);
        self.image_newline = Some(newline);
        Ok(())
    }

    /// LLaVA-NeXT's config fields on a Llava `config.json`.
    pub(crate) fn llava_next_config(&self, cfg: &mut serde_json::Value) {
        let Some(p) = self.anyres() else { return };
        cfg["architectures"] = serde_json::json!(["LlavaNextForConditionalGeneration"]);
        cfg["model_type"] = serde_json::json!("llava_next");
        cfg["image_grid_pinpoints"] =
            serde_json::json!(p.iter().map(|&(h, w)| [h, w]).collect::<Vec<_>>());
        // The count varies by image.
        if let Some(o) = cfg.as_object_mut() {
            o.remove("image_seq_length");
        }
        if let Some(v) = self.video_token_index() {
            cfg["architectures"] = serde_json::json!(["LlavaNextVideoForConditionalGeneration"]);
            cfg["model_type"] = serde_json::json!("llava_next_video");
            cfg["video_token_index"] = serde_json::json!(v);
            cfg["spatial_pool_mode"] = serde_json::json!("average");
            cfg["spatial_pool_stride"] = serde_json::json!(crate::video::POOL_STRIDE);
        }
    }

    /// preprocessor_config.json: the tower's, with LLaVA-NeXT's grid when
    /// images are tiled (`LlavaNextImageProcessor`).
    pub(crate) fn preprocessor_json(&self) -> serde_json::Value {
        let mut v = self.processor.config().to_hf_json();
        if let Some(p) = self.anyres() {
            v["image_processor_type"] = serde_json::json!("LlavaNextImageProcessor");
            v["image_grid_pinpoints"] =
                serde_json::json!(p.iter().map(|&(h, w)| [h, w]).collect::<Vec<_>>());
            v["do_pad"] = serde_json::json!(true);
        }
        v
    }

    /// Reads `image_grid_pinpoints` from a `llava_next` config and
    /// `image_newline` from its weights file `w`.
    pub(crate) fn read_anyres(
        &mut self,
        cfg: &serde_json::Value,
        w: &std::path::Path,
        device: &candle_core::Device,
    ) -> Result<()> {
        let pinpoints = cfg["image_grid_pinpoints"]
            .as_array()
            .ok_or_else(|| Error::Report("no image_grid_pinpoints".into()))?
            .iter()
            .map(|p| match (p[0].as_u64(), p[1].as_u64()) {
                (Some(h), Some(w)) => Ok((h as u32, w as u32)),
                _ => Err(Error::Report(format!(
                    "image_grid_pinpoints: {p} is not [height, width]"
                ))),
            })
            .collect::<Result<Vec<_>>>()?;
        let t =
            crate::checkpoint::load_prefixed(w, &["image_newline", "model.image_newline"], device)?;
        let newline = t
            .into_values()
            .next()
            .ok_or_else(|| Error::Report(format!("{}: no image_newline", w.display())))?;
        self.set_anyres(pinpoints, Some(newline), 0)?;
        if cfg["model_type"] == "llava_next_video" {
            if cfg["spatial_pool_mode"].as_str().unwrap_or("average") != "average"
                || cfg["spatial_pool_stride"].as_u64().unwrap_or(2)
                    != crate::video::POOL_STRIDE as u64
            {
                return Err(Error::Report(
                    "clasp pools video frames by 2×2 averages (spatial_pool_mode average, stride 2)"
                        .into(),
                ));
            }
            let v = cfg["video_token_index"]
                .as_u64()
                .or_else(|| cfg["video_token_id"].as_u64())
                .ok_or_else(|| Error::Report("no video_token_index".into()))?;
            self.cfg.video_token_index = Some(v as u32);
        }
        Ok(())
    }

    /// A tiled image as one flat vector (a training run's prepared pixels,
    /// handed from its loader to its step): the original height and width,
    /// then the tiles back to back. [`Self::tiles_from_flat`] reads it back.
    pub fn tiles_to_flat(px: &AnyResPixels) -> Vec<f32> {
        let mut v = Vec::with_capacity(2 + px.tiles.iter().map(Vec::len).sum::<usize>());
        // Exact: image sides are far below 2^24.
        v.extend([px.image_size.0 as f32, px.image_size.1 as f32]);
        for t in &px.tiles {
            v.extend_from_slice(t);
        }
        v
    }

    /// The tiled image [`Self::tiles_to_flat`] wrote, its grid recomputed
    /// from its size and this model's pinpoints.
    pub fn tiles_from_flat(&self, flat: &[f32]) -> Result<AnyResPixels> {
        let side = self.vision_cfg.image_size as u32;
        let tile = (self.vision_cfg.num_channels * (side as usize).pow(2)).max(1);
        let bad = || Error::Shape(format!("{} values are not a tiled image", flat.len()));
        if flat.len() < 2 || !(flat.len() - 2).is_multiple_of(tile) {
            return Err(bad());
        }
        let size = (flat[0] as u32, flat[1] as u32);
        let best = clasp_core::preprocess::anyres::select_best_resolution(size, self.pinpoints()?);
        let grid = ((best.0 / side) as usize, (best.1 / side) as usize);
        let tiles: Vec<Vec<f32>> = flat[2..].chunks(tile).map(<[f32]>::to_vec).collect();
        if tiles.len() != 1 + grid.0 * grid.1 {
            return Err(bad());
        }
        Ok(AnyResPixels {
            tiles,
            image_size: size,
            grid,
        })
    }

    /// `image_newline`, when the model is LLaVA-NeXT's.
    pub fn image_newline(&self) -> Option<&Tensor> {
        self.image_newline.as_ref()
    }

    fn pinpoints(&self) -> Result<&[(u32, u32)]> {
        self.anyres()
            .ok_or_else(|| Error::Report("this model does not tile images (no AnyRes)".into()))
    }

    /// An image's base picture and tiles, prepared for the tower.
    pub fn anyres_pixels(&self, img: &image::RgbImage) -> Result<AnyResPixels> {
        self.tiler()?.tile(img)
    }

    /// What tiling needs, apart from the model: a loader thread holds one.
    pub fn tiler(&self) -> Result<Tiler> {
        let side = self.vision_cfg.image_size as u32;
        // Each tile (and the base picture, already the tower's size) goes
        // through the tower's own processor for CLIP's ViT, whose resize and
        // crop leave a tile of its size as it is (LlavaNextImageProcessor);
        // a CNN's resize-256-crop-224 would cut a 224 tile's borders, so its
        // tiles are only rescaled and normalised.
        let mut cfg = self.processor.config().clone();
        if self.vision_cnn().is_some() {
            cfg.resize = clasp_core::preprocess::ResizeTo::Exact {
                height: side,
                width: side,
            };
            cfg.do_center_crop = false;
        }
        Ok(Tiler {
            pinpoints: self.pinpoints()?.to_vec(),
            side,
            processor: clasp_core::preprocess::ImageProcessor::new(cfg),
        })
    }

    /// Image tokens an image of `size` (height, width) takes in the prompt,
    /// as `LlavaNextProcessor` counts them.
    pub fn anyres_tokens(&self, size: (u32, u32)) -> Result<usize> {
        let side = self.vision_cfg.image_size;
        let per_side = side / self.vision_cfg.patch_size;
        Ok(feature_count(
            size,
            self.pinpoints()?,
            side as u32,
            per_side,
            0,
        ))
    }

    /// The image tokens [n, hidden] of one tiled image: the tower on the
    /// base picture and every tile, the connector, then [`pack`].
    pub fn anyres_features(&self, px: &AnyResPixels) -> Result<Tensor> {
        let newline = self.image_newline.as_ref();
        let feats = self.image_features(&self.pixel_batch(&px.tiles)?)?;
        pack(&feats, px.grid, px.image_size, newline)
    }

    /// `ids` with the k-th image placeholder repeated once per token of the
    /// k-th image, whose size is `sizes[k]` (LlavaNextProcessor's expansion).
    pub fn expand_images_sized(&self, ids: &[u32], sizes: &[(u32, u32)]) -> Result<Vec<u32>> {
        let counts = sizes
            .iter()
            .map(|&s| self.anyres_tokens(s))
            .collect::<Result<Vec<_>>>()?;
        crate::model::expand_slots(
            ids,
            self.cfg.image_token_index,
            &self.cfg.image_token,
            &counts,
        )
    }

    /// The prompt of `messages` (their `<image>` placeholders, one per
    /// tiled image, in order) with the assistant's turn opened: its ids,
    /// each placeholder expanded for its image's size, and its input
    /// embeddings with the images' tokens in place.
    pub(crate) fn anyres_prompt(
        &self,
        messages: &[crate::llm::Message],
        images: &[&AnyResPixels],
    ) -> Result<crate::llm::Prompt> {
        let sizes: Vec<(u32, u32)> = images.iter().map(|t| t.image_size).collect();
        let ids = self.render_unexpanded(messages, images.len())?;
        let ids = self.expand_images_sized(&ids, &sizes)?;
        let feats = images
            .iter()
            .map(|t| self.anyres_features(t))
            .collect::<Result<Vec<_>>>()?;
        let embeds = self.input_embeds_flat(&ids, &Tensor::cat(&feats, 0)?)?;
        Ok(crate::llm::Prompt {
            ids,
            embeds: Some(embeds),
        })
    }

    /// The token ids of one user turn (`<image>` where each image goes)
    /// through the chat template, the assistant's turn opened, the k-th
    /// placeholder expanded for an image of `sizes[k]` (height, width).
    pub fn chat_prompt_sized(&self, user: &str, sizes: &[(u32, u32)]) -> Result<Vec<u32>> {
        let ids = self.render_unexpanded(&[crate::llm::Message::new("user", user)], sizes.len())?;
        self.expand_images_sized(&ids, sizes)
    }

    /// Generates one answer per tiled image to the same user turn (one
    /// `<image>`), as one batch.
    pub fn generate_anyres(
        &self,
        images: &[AnyResPixels],
        user: &str,
        opts: &crate::llm::GenerateOptions,
    ) -> Result<Vec<crate::llm::Generation>> {
        let turn = [crate::llm::Message::new("user", user)];
        let prompts = images
            .iter()
            .map(|px| self.anyres_prompt(&turn, &[px]))
            .collect::<Result<Vec<_>>>()?;
        self.generate_prompts(&prompts, opts)
    }

    /// Logits [t, vocab] of one expanded prompt with its tiled images'
    /// tokens ([`Self::anyres_features`], one [n_k, hidden] per image).
    pub fn logits_anyres(&self, ids: &[u32], images: &[Tensor]) -> Result<Tensor> {
        self.logits_of_embeds(&self.input_embeds_flat(ids, &Tensor::cat(images, 0)?)?)
    }
}
