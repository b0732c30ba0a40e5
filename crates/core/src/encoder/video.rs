//! Embedding a video: frames sampled in time ([`crate::video`]), each
//! embedded as an image, and their mean (CLIP4Clip's mean-pooling baseline:
//! the mean of the L2-normalised frame embeddings, normalised again).

use super::*;
use crate::video::{self, Sampling, VideoInfo};

/// A video's frame embeddings with their timestamps, and their mean.
#[derive(Debug, Clone)]
pub struct VideoEmbedding {
    pub info: VideoInfo,
    /// Seconds from the start, one per frame.
    pub times: Vec<f64>,
    /// L2-normalised, one per frame.
    pub frames: Vec<Vec<f32>>,
    /// The normalised mean of `frames`.
    pub mean: Vec<f32>,
}

impl Encoder {
    /// Embeds the frames `sampling` picks from the video at `path`, `batch`
    /// frames at a time.
    pub fn embed_video(
        &self,
        path: &Path,
        sampling: Sampling,
        batch: usize,
    ) -> Result<VideoEmbedding> {
        let (info, frames) = video::frames(path, sampling)?;
        if frames.is_empty() {
            return Err(Error::Report(format!(
                "{}: the sampling picks no frame in {:.3} s",
                path.display(),
                info.duration
            )));
        }
        let mut rows: Vec<Vec<f32>> = Vec::with_capacity(frames.len());
        for chunk in frames.chunks(batch.max(1)) {
            let imgs: Vec<image::RgbImage> = chunk.iter().map(|f| f.image.clone()).collect();
            rows.extend(self.embed_images(&imgs)?.to_vec2::<f32>()?);
        }
        let dim = rows[0].len();
        let mut mean = vec![0f32; dim];
        for r in &rows {
            for (m, v) in mean.iter_mut().zip(r) {
                *m += v / rows.len() as f32;
            }
        }
        let norm = mean.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        mean.iter_mut().for_each(|v| *v /= norm);
        Ok(VideoEmbedding {
            info,
            times: frames.iter().map(|f| f.time).collect(),
            frames: rows,
            mean,
        })
    }
}
