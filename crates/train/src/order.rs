//! The data order of a run: each epoch shows every image once, with one of
//! its captions drawn at random, from a saved RNG state, so a resumed run
//! draws the same batches; and the per-item preparation of a batch's pixels,
//! seeded by (seed, step, position) so a resumed run draws the same crops.

use serde::{Deserialize, Serialize};

use crate::data::{ImageSource, PairSet};
use crate::preprocess::augment::ColorJitter;
use crate::preprocess::image::decode_image;
use crate::preprocess::ImageProcessor;
use crate::rng::Rng;
use crate::Result;

/// Where the data order stands: the epoch's image order with one caption
/// each, and the position in it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Order {
    rng: Rng,
    epoch: usize,
    /// (image, caption) pairs of the current epoch.
    pairs: Vec<(usize, usize)>,
    pos: usize,
}

impl Order {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: Rng(seed),
            epoch: 0,
            pairs: Vec::new(),
            pos: 0,
        }
    }

    /// The next batch: `n` distinct images, each with one of its captions.
    pub fn next_batch(&mut self, per_image: &[Vec<usize>], n: usize) -> Vec<(usize, usize)> {
        if self.pos + n > self.pairs.len() {
            let mut imgs: Vec<usize> = (0..per_image.len()).collect();
            self.rng.shuffle(&mut imgs);
            self.pairs = imgs
                .into_iter()
                .map(|i| {
                    let caps = &per_image[i];
                    (i, caps[self.rng.below(caps.len())])
                })
                .collect();
            self.pos = 0;
            self.epoch += 1;
        }
        let b = self.pairs[self.pos..self.pos + n].to_vec();
        self.pos += n;
        b
    }
}

/// The run's training pairs and each image's caption indices, refusing a
/// set smaller than one batch.
pub fn training_pairs(cfg: &super::config::TrainConfig) -> Result<(PairSet, Vec<Vec<usize>>)> {
    let spec = cfg
        .dataset
        .as_ref()
        .ok_or_else(|| crate::Error::Report("the run has no dataset".into()))?;
    let set = crate::data::load_pairs(spec, cfg.split, cfg.lang, None)?;
    if set.images.len() < cfg.batch_size {
        return Err(crate::Error::Dataset(format!(
            "{}: {} images, fewer than one batch of {}",
            set.name,
            set.images.len(),
            cfg.batch_size
        )));
    }
    let mut set = set;
    add_caption_noise(&mut set, cfg.caption_noise, cfg.seed);
    let per_image = captions_per_image(&set);
    Ok((set, per_image))
}

/// Rotates a `fraction` of the captions (drawn by `seed`) among themselves:
/// each drawn caption's text goes to the next drawn caption's image, so the
/// pairs become wrong ones (the same image only when two drawn captions
/// share it).
pub fn add_caption_noise(set: &mut PairSet, fraction: f64, seed: u64) {
    let n = (fraction * set.captions.len() as f64).round() as usize;
    if n < 2 {
        return;
    }
    let mut idx: Vec<usize> = (0..set.captions.len()).collect();
    Rng(seed ^ 0x0015_E0CA_9710).shuffle(&mut idx);
    let drawn = &idx[..n];
    let texts: Vec<String> = drawn.iter().map(|&c| set.captions[c].clone()).collect();
    for (k, &c) in drawn.iter().enumerate() {
        set.captions[c] = texts[(k + 1) % n].clone();
    }
    tracing::info!(captions = n, "caption noise: rotated among their images");
}

/// Opens a run's metrics.jsonl for appending (a resumed run continues it).
pub fn open_metrics(out: &std::path::Path) -> Result<(std::fs::File, std::path::PathBuf)> {
    let path = out.join("metrics.jsonl");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| crate::Error::io(&path, e))?;
    Ok((f, path))
}

/// Each image's caption indices.
pub fn captions_per_image(set: &PairSet) -> Vec<Vec<usize>> {
    let mut per_image: Vec<Vec<usize>> = vec![Vec::new(); set.images.len()];
    for (c, &i) in set.caption_image.iter().enumerate() {
        per_image[i].push(c);
    }
    per_image
}

/// The captions of a batch's (image, caption) pairs.
pub fn batch_texts<'a>(set: &'a PairSet, batch: &[(usize, usize)]) -> Vec<&'a str> {
    batch
        .iter()
        .map(|(_, c)| set.captions[*c].as_str())
        .collect()
}

/// How training images are augmented.
#[derive(Clone, Copy)]
pub struct Augment {
    pub crop_scale: f64,
    pub jitter: Option<ColorJitter>,
    pub seed: u64,
}

/// Decodes, augments and preprocesses the image at `position` of the batch
/// of `step`.
pub fn prepare_image(
    proc: &ImageProcessor,
    src: &ImageSource,
    aug: Augment,
    step: usize,
    position: usize,
) -> Result<Vec<f32>> {
    let bytes = src.read()?;
    let img = decode_image(&bytes, &src.path())?;
    let mut rng = Rng(aug.seed ^ 0xA5A5_5A5A ^ ((step as u64) << 20) ^ position as u64);
    rng.next_u64();
    let mut uniform = || (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    proc.process_train(&img, aug.crop_scale, aug.jitter.as_ref(), &mut uniform)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caption_noise_rotates_the_drawn_fraction_among_other_images() {
        let captions: Vec<String> = (0..20).map(|i| format!("caption {i}")).collect();
        let mut set = PairSet {
            name: "t".into(),
            images: Vec::new(),
            image_ids: (0..20).map(|i| i.to_string()).collect(),
            captions: captions.clone(),
            caption_image: (0..20).collect(),
            issues: Vec::new(),
        };
        add_caption_noise(&mut set, 0.3, 5);
        let moved: Vec<usize> = (0..20)
            .filter(|&c| set.captions[c] != captions[c])
            .collect();
        // 6 of 20 captions, each now on another image (one caption per image).
        assert_eq!(moved.len(), 6, "{moved:?}");
        let mut a = set.captions.clone();
        let mut b = captions.clone();
        a.sort();
        b.sort();
        assert_eq!(a, b, "the captions are the same multiset");
        // The draw is the seed's: the same again, another with another seed.
        let mut again = set.clone();
        again.captions = captions.clone();
        add_caption_noise(&mut again, 0.3, 5);
        assert_eq!(again.captions, set.captions);
        again.captions = captions.clone();
        add_caption_noise(&mut again, 0.3, 6);
        assert_ne!(again.captions, set.captions);
    }
}
