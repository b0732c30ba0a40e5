//! The frozen distillation teacher of a run.

use candle_core::Device;

use super::config::TrainConfig;
use crate::preprocess::ImageProcessor;
use crate::{Encoder, Error, Result};

/// The distillation teacher, when `distill` is among the objectives.
pub(super) fn load_teacher(
    cfg: &TrainConfig,
    wanted: bool,
    dev: &Device,
) -> Result<Option<Encoder>> {
    let Some(spec) = cfg.teacher.as_deref() else {
        return if wanted {
            Err(Error::Report(
                "objective `distill` needs a teacher: --teacher CHECKPOINT".into(),
            ))
        } else {
            Ok(None)
        };
    };
    if !wanted {
        return Err(Error::Report(format!(
            "--teacher {spec} is given but no `distill` objective uses it (add e.g. --objective infonce,distill:1)"
        )));
    }
    Ok(Some(Encoder::load(spec, dev)?))
}

/// The teacher sees the student's pixels, so the two must preprocess alike
/// (same crop size, mean and std); texts go through the teacher's own
/// tokenizer.
pub(super) fn check_teacher_pixels(
    te: &Encoder,
    spec: &str,
    student: &ImageProcessor,
) -> Result<()> {
    let (a, b) = (student.config(), te.image_processor().config());
    if (a.crop, a.mean, a.std) != (b.crop, b.mean, b.std) {
        return Err(Error::Report(format!(
            "teacher {spec} preprocesses images differently from the student (crop {:?} mean {:?} std {:?} vs the student's {:?} {:?} {:?}); distillation shares the student's pixels, so they must match",
            b.crop, b.mean, b.std, a.crop, a.mean, a.std
        )));
    }
    Ok(())
}
