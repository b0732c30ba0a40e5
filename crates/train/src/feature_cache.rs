//! Image features computed once for a run whose image tower is locked and
//! whose images are not augmented: the tower then gives every image the same
//! pooled output at every step, so it runs once per image instead of once
//! per step (LiT's recipe; with a pretrained CNN tower this is most of the
//! work a step would otherwise do).

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::order::{prepare_image, Augment};
use crate::data::ImageSource;
use crate::preprocess::ImageProcessor;
use crate::Result;
use clasp_core::model::Model;

/// Images per forward pass while filling the cache.
const BATCH: usize = 32;

/// The pooled image features [C] of every image of the training set, or
/// `None` where the image could not be read (the run then meets that error
/// again at the image's turn, and skips it as it does any bad image).
pub struct FeatureCache {
    rows: Vec<Option<Vec<f32>>>,
    dim: usize,
}

impl FeatureCache {
    /// Runs the locked tower over every image, unaugmented.
    pub fn fill(
        frozen: &Model,
        proc: &ImageProcessor,
        images: &[ImageSource],
        image_shape: (usize, usize, usize),
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let _mode = clasp_core::model::grad_mode_guard(false);
        let plain = Augment {
            crop_scale: 1.0,
            jitter: None,
            seed,
        };
        let t0 = std::time::Instant::now();
        let mut rows: Vec<Option<Vec<f32>>> = Vec::with_capacity(images.len());
        let mut dim = 0;
        let (c, h, w) = image_shape;
        for (k, chunk) in images.chunks(BATCH).enumerate() {
            let pixels: Vec<Option<Vec<f32>>> = chunk
                .par_iter()
                .map(|src| prepare_image(proc, src, plain, 0, 0).ok())
                .collect();
            let ok: Vec<&Vec<f32>> = pixels.iter().flatten().collect();
            let mut pooled = Vec::new().into_iter();
            if !ok.is_empty() {
                let flat: Vec<f32> = ok.iter().flat_map(|p| p.iter().copied()).collect();
                let px = Tensor::from_vec(flat, (ok.len(), c, h, w), device)?;
                let out = frozen.image_pooled(&px)?;
                dim = out.dim(1)?;
                pooled = out.to_vec2::<f32>()?.into_iter();
            }
            for p in &pixels {
                rows.push(p.as_ref().and_then(|_| pooled.next()));
            }
            if k % 20 == 19 {
                tracing::info!(
                    "image features: {}/{} images ({:.0} s)",
                    rows.len(),
                    images.len(),
                    t0.elapsed().as_secs_f64()
                );
            }
        }
        tracing::info!(
            "cached the locked image tower's features of {} images in {:.0} s",
            images.len(),
            t0.elapsed().as_secs_f64()
        );
        Ok(Self { rows, dim })
    }

    /// Whether image `i` has cached features.
    pub fn has(&self, i: usize) -> bool {
        self.rows.get(i).is_some_and(Option::is_some)
    }

    /// The cached features of these images as one [B, C] tensor.
    pub fn batch(&self, images: &[usize], device: &Device) -> Result<Tensor> {
        let mut flat = Vec::with_capacity(images.len() * self.dim);
        for &i in images {
            let row =
                self.rows.get(i).and_then(Option::as_ref).ok_or_else(|| {
                    crate::Error::Report(format!("image {i} has no cached features"))
                })?;
            flat.extend_from_slice(row);
        }
        Ok(Tensor::from_vec(flat, (images.len(), self.dim), device)?)
    }
}
