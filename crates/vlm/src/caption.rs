//! Captioning many images: prepared on a worker one batch ahead, generated a
//! batch at a time, each image's failure kept with it.

use super::model::Vlm;
use crate::data::ImageSource;
use crate::llm::{GenerateOptions, Generation};
use crate::preprocess::image::decode_image;
use crate::preprocess::pipeline;
use crate::progress::Progress;
use crate::Result;
use clasp_core::preprocess::anyres::AnyResPixels;

/// Answers `user` (one `<video>`) for every video, `frames` frames each
/// (FFmpeg, the centres of equal spans). One entry per video, in order: its
/// generation, or the error that names it.
pub fn caption_videos(
    vlm: &Vlm,
    videos: &[std::path::PathBuf],
    user: &str,
    opts: &GenerateOptions,
    frames: usize,
    progress: &dyn Progress,
) -> Result<Vec<Result<Generation>>> {
    // A bad prompt, or a model that reads no videos, fails once.
    vlm.chat_prompt_video(user, frames)?;
    progress.start("captioning videos", videos.len() as u64);
    let out = videos
        .iter()
        .map(|p| {
            let g = vlm
                .video_frames(p, frames)
                .and_then(|f| vlm.generate_video(&f, user, opts))
                .map_err(|e| crate::Error::Report(format!("{}: {e}", p.display())));
            progress.inc(1);
            g
        })
        .collect();
    progress.finish();
    Ok(out)
}

/// An image prepared for the tower: one square, or AnyRes tiles.
enum Prepared {
    Square(Vec<f32>),
    Tiled(AnyResPixels),
}

/// Answers `user` (one `<image>` placeholder) for every image, `batch` at a
/// time. The result has one entry per image, in order: its generation, or
/// the error that kept it from being read.
pub fn caption_images(
    vlm: &Vlm,
    images: &[ImageSource],
    user: &str,
    opts: &GenerateOptions,
    batch: usize,
    progress: &dyn Progress,
) -> Result<Vec<Result<Generation>>> {
    // A bad prompt fails once, before any image is read.
    let side = vlm.vision_config().image_size as u32;
    match vlm.anyres() {
        Some(_) => vlm.chat_prompt_sized(user, &[(side, side)]).map(|_| ())?,
        None => vlm.chat_prompt(user, 1).map(|_| ())?,
    }
    let mut out: Vec<Option<Result<Generation>>> = (0..images.len()).map(|_| None).collect();
    progress.start("captioning", images.len() as u64);
    let proc = vlm.image_processor();
    // A LLaVA-NeXT model tiles each image at its own grid.
    let tiler = vlm.tiler().ok();
    pipeline::prepare_ahead(
        pipeline::batches((0..images.len()).collect(), batch),
        |_, _, &i| {
            let src = &images[i];
            let img = decode_image(&src.read()?, &src.path())?;
            match &tiler {
                Some(t) => t.tile(&img).map(Prepared::Tiled),
                None => proc.process(&img).map(Prepared::Square),
            }
        },
        |prepared| {
            let n = prepared.len();
            let (ok, pixels, failed) = pipeline::partition(prepared);
            for (i, e) in failed {
                out[i] = Some(Err(e));
            }
            if !ok.is_empty() {
                let mut square = Vec::new();
                let mut tiled = Vec::new();
                for p in pixels {
                    match p {
                        Prepared::Square(px) => square.push(px),
                        Prepared::Tiled(t) => tiled.push(t),
                    }
                }
                let answers = if tiled.is_empty() {
                    vlm.generate(&vlm.pixel_batch(&square)?, user, opts)?
                } else {
                    vlm.generate_anyres(&tiled, user, opts)?
                };
                for (i, g) in ok.into_iter().zip(answers) {
                    out[i] = Some(Ok(g));
                }
            }
            progress.inc(n as u64);
            Ok(true)
        },
    )?;
    progress.finish();
    Ok(out
        .into_iter()
        .map(|r| r.expect("every image has a result"))
        .collect())
}
