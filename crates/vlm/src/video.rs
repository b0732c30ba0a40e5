//! Video in the VLM, LLaVA-NeXT-Video's way
//! (`LlavaNextVideoForConditionalGeneration`): each frame through the
//! tower, its patch map average-pooled 2×2 (`spatial_pool_stride` 2), the
//! connector on the pooled tokens, the frames' tokens in time order where
//! the `<video>` placeholder stands (expanded to frames × pooled tokens, as
//! `LlavaNextVideoProcessor` expands it). Images keep LLaVA-NeXT's AnyRes.

use candle_core::Tensor;

use crate::connector::ConnectorKind;
use crate::model::{FeatureSelect, Vlm};
use crate::{Error, Result};

/// LLaVA-NeXT-Video's pooling: an average over stride × stride patches.
pub const POOL_STRIDE: usize = 2;

/// The placeholder a prompt writes where a video goes.
pub const VIDEO_TOKEN: &str = "<video>";

/// Frames sampled from a video when none is said (LLaVA-NeXT-Video's 8).
pub const DEFAULT_FRAMES: usize = 8;

/// The default instructions for a video: English and Chinese.
pub const DESCRIBE_VIDEO_EN: &str = "Describe the video.";
pub const DESCRIBE_VIDEO_ZH: &str = "描述这段视频。";

impl Vlm {
    /// The `<video>` token's id, when the model reads videos.
    pub fn video_token_index(&self) -> Option<u32> {
        self.cfg.video_token_index
    }

    /// Makes a LLaVA-NeXT model (see [`Vlm::set_anyres`]) read videos too:
    /// the tokenizer gains `<video>`.
    pub fn enable_video(&mut self) -> Result<()> {
        if self.anyres().is_none() {
            return Err(Error::Report(
                "video follows LLaVA-NeXT-Video, whose images are tiled: give --anyres too".into(),
            ));
        }
        if self.vision_cnn().is_some()
            || self.cfg.select != FeatureSelect::Default
            || !matches!(self.cfg.connector, ConnectorKind::Mlp2xGelu)
        {
            return Err(Error::Report(
                "video pools a ViT's patch map 2×2 before the mlp2x_gelu connector".into(),
            ));
        }
        let side = self.vision_cfg.image_size / self.vision_cfg.patch_size;
        if !side.is_multiple_of(POOL_STRIDE) {
            return Err(Error::Report(format!(
                "a {side}×{side} patch map does not pool {POOL_STRIDE}×{POOL_STRIDE}"
            )));
        }
        self.cfg.video_token_index = Some(self.tokenizer.add_special_token(VIDEO_TOKEN));
        Ok(())
    }

    fn video_id(&self) -> Result<u32> {
        self.video_token_index()
            .ok_or_else(|| Error::Report("this model reads no videos (no <video> token)".into()))
    }

    /// Tokens per frame after pooling.
    pub fn video_tokens_per_frame(&self) -> usize {
        let side = self.vision_cfg.image_size / self.vision_cfg.patch_size / POOL_STRIDE;
        side * side
    }

    /// The tokens [frames · per frame, hidden] of a video's prepared frames
    /// `[F, C, S, S]`.
    pub fn video_features(&self, frames: &Tensor) -> Result<Tensor> {
        self.video_id()?;
        let patches = self.patch_features(frames)?; // [F, P, vis]
        let (f, p, d) = patches.dims3()?;
        let side = (p as f64).sqrt().round() as usize;
        let pooled = patches
            .reshape((f, side, side, d))?
            .permute((0, 3, 1, 2))?
            .avg_pool2d(POOL_STRIDE)?
            .flatten_from(2)?
            .transpose(1, 2)?
            .contiguous()?; // [F, P/4, vis]
        let tokens = self.connector.forward(&pooled)?;
        Ok(tokens.reshape((f * tokens.dim(1)?, tokens.dim(2)?))?)
    }

    /// The token ids of one user turn with one `<video>` of `frames` frames
    /// (and no image), through the chat template with the assistant's turn
    /// opened, the placeholder expanded.
    pub fn chat_prompt_video(&self, user: &str, frames: usize) -> Result<Vec<u32>> {
        let ids = self.render_unexpanded(&[crate::llm::Message::new("user", user)], 0)?;
        self.expand_video(&ids, frames)
    }

    /// `ids` with its one `<video>` expanded for `frames` frames.
    pub fn expand_video(&self, ids: &[u32], frames: usize) -> Result<Vec<u32>> {
        let n = frames * self.video_tokens_per_frame();
        crate::model::expand_slots(ids, self.video_id()?, VIDEO_TOKEN, &[n])
    }

    /// The prompt of `messages` (one `<video>`, no image) with the
    /// assistant's turn opened, for a video's prepared frames `[F, C, S, S]`:
    /// its ids, the placeholder expanded, and its input embeddings with the
    /// frames' tokens in place.
    pub(crate) fn video_prompt(
        &self,
        messages: &[crate::llm::Message],
        frames: &Tensor,
    ) -> Result<crate::llm::Prompt> {
        let ids = self.render_unexpanded(messages, 0)?;
        let ids = self.expand_video(&ids, frames.dim(0)?)?;
        let embeds = self.input_embeds_video(&ids, &self.video_features(frames)?)?;
        Ok(crate::llm::Prompt {
            ids,
            embeds: Some(embeds),
        })
    }

    /// Input embeddings `[t, hidden]` of a prompt whose video positions take
    /// the rows of `video` in order.
    pub fn input_embeds_video(&self, ids: &[u32], video: &Tensor) -> Result<Tensor> {
        self.input_embeds_filled(ids, self.video_id()?, video)
    }

    /// Logits [t, vocab] of one expanded prompt with its video's tokens.
    pub fn logits_video(&self, ids: &[u32], video: &Tensor) -> Result<Tensor> {
        self.logits_of_embeds(&self.input_embeds_video(ids, video)?)
    }

    /// `count` frames of the video at `path` (the centres of equal spans,
    /// through FFmpeg), prepared for the tower as `[F, C, S, S]`.
    pub fn video_frames(&self, path: &std::path::Path, count: usize) -> Result<Tensor> {
        use clasp_core::video::{frame_at, probe, sample_times, Sampling};
        let info = probe(path)?;
        let frames = sample_times(info.duration, Sampling::Count(count.max(1)))
            .into_iter()
            .map(|t| {
                let f = frame_at(&info, t)?;
                self.processor.process_pixels(&f.image).map(|p| p.data)
            })
            .collect::<Result<Vec<_>>>()?;
        self.pixel_batch(&frames)
    }

    /// Answers `user` (one `<video>`) about a video's prepared frames.
    pub fn generate_video(
        &self,
        frames: &Tensor,
        user: &str,
        opts: &crate::llm::GenerateOptions,
    ) -> Result<crate::llm::Generation> {
        let prompt = self.video_prompt(&[crate::llm::Message::new("user", user)], frames)?;
        let mut g = self.generate_prompts(&[prompt], opts)?;
        Ok(g.remove(0))
    }
}
