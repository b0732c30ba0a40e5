//! Captioning many images: prepared on a worker one batch ahead, generated a
//! batch at a time, each image's failure kept with it.

use super::model::Vlm;
use crate::data::ImageSource;
use crate::llm::{GenerateOptions, Generation};
use crate::preprocess::image::decode_image;
use crate::preprocess::pipeline;
use crate::progress::Progress;
use crate::Result;

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
    vlm.chat_prompt(user, 1)?;
    let mut out: Vec<Option<Result<Generation>>> = (0..images.len()).map(|_| None).collect();
    progress.start("captioning", images.len() as u64);
    let proc = vlm.image_processor();
    pipeline::prepare_ahead(
        pipeline::batches((0..images.len()).collect(), batch),
        |_, _, &i| {
            let src = &images[i];
            proc.process(&decode_image(&src.read()?, &src.path())?)
        },
        |prepared| {
            let n = prepared.len();
            let (ok, pixels, failed) = pipeline::partition(prepared);
            for (i, e) in failed {
                out[i] = Some(Err(e));
            }
            if !ok.is_empty() {
                let px = vlm.pixel_batch(&pixels)?;
                for (i, g) in ok.into_iter().zip(vlm.generate(&px, user, opts)?) {
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
