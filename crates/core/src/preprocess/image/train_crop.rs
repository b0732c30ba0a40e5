//! Training preprocessing: open_clip's RandomResizedCrop, then the colour jitter of `augment` and normalisation.

use super::*;

impl ImageProcessor {
    /// Training preprocessing, in open_clip's order: RandomResizedCrop with
    /// area in [`crop_scale`, 1] (the evaluation resize and crop when
    /// `crop_scale` >= 1), colour jitter when given, then normalisation. All
    /// randomness comes from `uniform`, so the same draws give the same pixels.
    pub fn process_train(
        &self,
        img: &RgbImage,
        crop_scale: f64,
        jitter: Option<&crate::preprocess::augment::ColorJitter>,
        uniform: &mut dyn FnMut() -> f64,
    ) -> Result<Vec<f32>> {
        let mut out = if crop_scale < 1.0 {
            self.random_resized_crop(img, (crop_scale, 1.0), uniform)
        } else {
            self.resize_and_crop(img)
        };
        if let Some(j) = jitter {
            j.apply(&mut out, uniform);
        }
        Ok(self.normalize(&out))
    }

    /// Training augmentation: torchvision's `RandomResizedCrop` (area in
    /// `scale`, aspect ratio in [3/4, 4/3], ten tries, then a centre crop of
    /// clamped ratio), resized bicubically to the model's input size.
    /// `uniform` draws from [0, 1); the same draws give the same crop, so
    /// seeded training is reproducible.
    pub(super) fn random_resized_crop(
        &self,
        img: &RgbImage,
        scale: (f64, f64),
        uniform: &mut dyn FnMut() -> f64,
    ) -> RgbImage {
        let (w0, h0) = (img.width() as f64, img.height() as f64);
        let area = w0 * h0;
        let (lr0, lr1) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
        let mut crop = None;
        for _ in 0..10 {
            let target = area * (scale.0 + (scale.1 - scale.0) * uniform());
            let aspect = (lr0 + (lr1 - lr0) * uniform()).exp();
            let w = (target * aspect).sqrt().round();
            let h = (target / aspect).sqrt().round();
            if w > 0.0 && h > 0.0 && w <= w0 && h <= h0 {
                let top = ((h0 - h + 1.0) * uniform()).floor().min(h0 - h);
                let left = ((w0 - w + 1.0) * uniform()).floor().min(w0 - w);
                crop = Some((left as u32, top as u32, w as u32, h as u32));
                break;
            }
        }
        let (x, y, w, h) = crop.unwrap_or_else(|| {
            let ratio = w0 / h0;
            let (w, h) = if ratio < 3.0 / 4.0 {
                (w0, (w0 / (3.0 / 4.0)).round())
            } else if ratio > 4.0 / 3.0 {
                ((h0 * 4.0 / 3.0).round(), h0)
            } else {
                (w0, h0)
            };
            (
                ((w0 - w) / 2.0) as u32,
                ((h0 - h) / 2.0) as u32,
                w as u32,
                h as u32,
            )
        });
        let region = image::imageops::crop_imm(img, x, y, w.max(1), h.max(1)).to_image();
        let (oh, ow) = if self.cfg.do_center_crop {
            self.cfg.crop
        } else {
            resize_target((img.height(), img.width()), self.cfg.resize)
        };
        crate::preprocess::resample::resize_bicubic_pil(&region, ow, oh)
    }
}
