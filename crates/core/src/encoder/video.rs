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
        let info = video::probe(path)?;
        let mut rows: Vec<Vec<f32>> = Vec::new();
        let times = match sampling {
            // By rate: one FFmpeg pass, the frames embedded as they come.
            Sampling::Fps(fps) => {
                let mut pending: Vec<image::RgbImage> = Vec::new();
                let times = video::each_frame_at_rate(&info, fps, |im| {
                    pending.push(im);
                    if pending.len() >= batch.max(1) {
                        rows.extend(self.embed_images(&pending)?.to_vec2::<f32>()?);
                        pending.clear();
                    }
                    Ok(())
                })?;
                if !pending.is_empty() {
                    rows.extend(self.embed_images(&pending)?.to_vec2::<f32>()?);
                }
                times
            }
            // By count: each span's centre, sought.
            Sampling::Count(_) => {
                let mut times = Vec::new();
                let picks = video::sample_times(info.duration, sampling);
                for chunk in picks.chunks(batch.max(1)) {
                    let frames = chunk
                        .iter()
                        .map(|&t| video::frame_at(&info, t))
                        .collect::<Result<Vec<_>>>()?;
                    times.extend(frames.iter().map(|f| f.time));
                    let imgs: Vec<image::RgbImage> = frames.into_iter().map(|f| f.image).collect();
                    rows.extend(self.embed_images(&imgs)?.to_vec2::<f32>()?);
                }
                times
            }
        };
        if rows.is_empty() {
            return Err(Error::Report(format!(
                "{}: the sampling picks no frame in {:.3} s",
                path.display(),
                info.duration
            )));
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
            times,
            frames: rows,
            mean,
        })
    }
}
