//! Image features computed once for a run whose image tower is locked and
//! whose images are not augmented: the tower then gives every image the same
//! pooled output at every step, so it runs once per image instead of once
//! per step (LiT's recipe; with a pretrained CNN tower this is most of the
//! work a step would otherwise do).
//!
//! The features are also kept on disk (`$CLASP_CACHE_DIR/train-features`,
//! else the platform cache dir), keyed by the tower's weights, the image
//! preprocessing and every image's identity (path, size and modification
//! time, or an inline image's bytes), so a second run on the same tower and
//! data (another seed, a resumed run) reads them instead of recomputing.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::order::{prepare_image, Augment};
use crate::data::ImageSource;
use crate::dist::Collective;
use crate::preprocess::ImageProcessor;
use crate::Result;
use clasp_core::model::Model;

/// The locked tower as the cache runs it: pixels [B, C, H, W] to each
/// image's features [B, ...] (pooled, or a feature map's tokens).
pub type Encode<'a> = &'a dyn Fn(&Tensor) -> Result<Tensor>;

/// What a run's features come from: the locked tower, what of it is kept
/// (`what`, part of the cache's key: "pooled", "tokens"), the
/// preprocessing, the images and the pixel shape.
pub struct Source<'a> {
    pub encode: Encode<'a>,
    pub what: &'a str,
    pub proc: &'a ImageProcessor,
    pub images: &'a [ImageSource],
    /// (channels, height, width).
    pub shape: (usize, usize, usize),
    pub seed: u64,
    pub device: &'a Device,
}

/// The cache a run uses: with the image tower locked (`frozen` is its
/// snapshot), unless augmentation or a teacher needs fresh pixels at every
/// step (`fresh_pixels`, or `crop_scale` below 1), when the tower runs each
/// step and this says so. The ranks of `group` fill it together.
#[allow(clippy::too_many_arguments)]
pub fn for_run(
    cfg: &super::config::TrainConfig,
    t: &super::model::Trainable,
    frozen: &Model,
    proc: &ImageProcessor,
    images: &[ImageSource],
    fresh_pixels: bool,
    device: &Device,
    group: &dyn Collective,
) -> Result<Option<std::sync::Arc<FeatureCache>>> {
    if fresh_pixels || cfg.crop_scale < 1.0 {
        tracing::info!(
            "the locked image tower runs at every step: augmentation (crop_scale {}, color \
             jitter) or a teacher needs fresh pixels; with crop_scale 1 and no jitter its \
             features are computed once",
            cfg.crop_scale
        );
        return Ok(None);
    }
    let v = t.config.vision();
    let tower: Vec<(String, Tensor)> = t
        .vars()
        .into_iter()
        .filter(|(n, _)| n.starts_with("vision_model."))
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    let src = Source {
        encode: &|px| frozen.image_pooled(px),
        what: "pooled",
        proc,
        images,
        shape: (v.num_channels, v.image_size, v.image_size),
        seed: cfg.seed,
        device,
    };
    Ok(Some(std::sync::Arc::new(FeatureCache::load_or_fill_in(
        &src, &tower, group,
    )?)))
}

/// Images per forward pass while filling the cache.
const BATCH: usize = 32;

/// The features of every image of the training set (each of shape `tail`,
/// kept flat), or `None` where the image could not be read (the run then
/// meets that error again at the image's turn, and skips it as it does any
/// bad image).
pub struct FeatureCache {
    rows: Vec<Option<Vec<f32>>>,
    tail: Vec<usize>,
}

/// Where the on-disk copies live.
fn cache_dir() -> std::path::PathBuf {
    clasp_common::cache_root().join("train-features")
}

/// The key of a run's features: everything they depend on.
fn key(
    what: &str,
    tower: &[(String, Tensor)],
    proc: &ImageProcessor,
    images: &[ImageSource],
    shape: (usize, usize, usize),
) -> Result<String> {
    let mut h = blake3::Hasher::new();
    h.update(b"clasp-train-features-v1\0");
    // The pooled features' key stays what it was (caches made before
    // `what` existed still match).
    if what != "pooled" {
        h.update(what.as_bytes());
        h.update(&[0]);
    }
    h.update(&proc.config().key_bytes());
    for d in [shape.0, shape.1, shape.2] {
        h.update(&(d as u64).to_le_bytes());
    }
    for (name, t) in tower {
        h.update(name.as_bytes());
        h.update(&[0]);
        let v: Vec<f32> = t
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1()?;
        for x in v {
            h.update(&x.to_le_bytes());
        }
    }
    for src in images {
        match src {
            ImageSource::File(p) => stamp(&mut h, p),
            ImageSource::Inline { name, data } => {
                h.update(name.as_bytes());
                h.update(blake3::hash(data).as_bytes());
            }
            // The member's place and length, and its shard's size and time.
            ImageSource::TarMember {
                shard,
                member,
                offset,
                len,
            } => {
                stamp(&mut h, shard);
                h.update(member.as_bytes());
                h.update(&offset.to_le_bytes());
                h.update(&len.to_le_bytes());
            }
        }
        h.update(&[0xff]);
    }
    Ok(h.finalize().to_hex().to_string())
}

/// A file's path, size and modification time into the key.
fn stamp(h: &mut blake3::Hasher, p: &std::path::Path) {
    h.update(p.to_string_lossy().as_bytes());
    if let Ok(m) = std::fs::metadata(p) {
        h.update(&m.len().to_le_bytes());
        let t = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
        h.update(&t.map_or(0, |t| t.as_nanos()).to_le_bytes());
    }
}

impl FeatureCache {
    /// The features from the disk cache when a run with the same tower,
    /// preprocessing and images stored them, else [`Self::fill`]ed and
    /// stored. `tower` is the locked tower's parameters by name. A cache
    /// that cannot be read or written is only a warning: the features are
    /// then computed.
    pub fn load_or_fill(src: &Source, tower: &[(String, Tensor)]) -> Result<Self> {
        Self::load_or_fill_in(src, tower, &crate::dist::Single)
    }

    /// [`Self::load_or_fill`] by the ranks of `group` together: each fills
    /// the images whose index is its rank modulo the world size (so each
    /// reads only its share), the features are gathered, and rank 0 stores
    /// them. The disk copy is read only when every rank finds it.
    pub fn load_or_fill_in(
        src: &Source,
        tower: &[(String, Tensor)],
        group: &dyn Collective,
    ) -> Result<Self> {
        let path = cache_dir().join(format!(
            "{}.safetensors",
            key(src.what, tower, src.proc, src.images, src.shape)?
        ));
        if group.world() > 1 {
            let loaded = match path.is_file() {
                true => Self::read(&path, src.images.len()).ok(),
                false => None,
            };
            if !crate::dist::any(group, loaded.is_none())? {
                tracing::info!("image features from the cache {}", path.display());
                return Ok(loaded.expect("every rank read the cache"));
            }
            let c = Self::fill_shared(src, group)?;
            if group.rank() == 0 {
                if let Err(e) = c.write(&path) {
                    tracing::warn!("could not store the feature cache {}: {e}", path.display());
                }
            }
            return Ok(c);
        }
        if path.is_file() {
            match Self::read(&path, src.images.len()) {
                Ok(c) => {
                    tracing::info!("image features from the cache {}", path.display());
                    return Ok(c);
                }
                Err(e) => tracing::warn!("ignoring the feature cache {}: {e}", path.display()),
            }
        }
        let c = Self::fill(src)?;
        if let Err(e) = c.write(&path) {
            tracing::warn!("could not store the feature cache {}: {e}", path.display());
        }
        Ok(c)
    }

    fn write(&self, path: &std::path::Path) -> Result<()> {
        let dir = path.parent().expect("a file in the cache dir");
        std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, e))?;
        let n = self.rows.len();
        let dim = self.dim();
        let mut flat = Vec::with_capacity(n * dim);
        let mut valid = Vec::with_capacity(n);
        for r in &self.rows {
            match r {
                Some(v) => flat.extend_from_slice(v),
                None => flat.extend(std::iter::repeat_n(0f32, dim)),
            }
            valid.push(r.is_some() as u8);
        }
        let t: std::collections::HashMap<String, Tensor> = [
            (
                "features".to_string(),
                Tensor::from_vec(flat, [&[n][..], &self.tail].concat(), &Device::Cpu)?,
            ),
            (
                "valid".to_string(),
                Tensor::from_vec(valid, n, &Device::Cpu)?,
            ),
        ]
        .into_iter()
        .collect();
        let tmp = crate::atomic::temp_beside(path);
        candle_core::safetensors::save(&t, &tmp)?;
        std::fs::rename(&tmp, path).map_err(|e| crate::Error::io(path, e))
    }

    fn read(path: &std::path::Path, n: usize) -> Result<Self> {
        let t = candle_core::safetensors::load(path, &Device::Cpu)?;
        let get = |k: &str| {
            t.get(k)
                .ok_or_else(|| crate::Error::Report(format!("no `{k}` tensor")))
        };
        let f = get("features")?;
        let (rows, tail) = (f.dim(0)?, f.dims()[1..].to_vec());
        let valid: Vec<u8> = get("valid")?.to_vec1()?;
        if rows != n || valid.len() != n {
            return Err(crate::Error::Report(format!("{rows} rows for {n} images")));
        }
        let feats: Vec<Vec<f32>> = f.flatten_from(1)?.to_vec2()?;
        Ok(Self {
            rows: feats
                .into_iter()
                .zip(valid)
                .map(|(r, ok)| (ok == 1).then_some(r))
                .collect(),
            tail,
        })
    }

    /// Runs the locked tower over every image, unaugmented.
    pub fn fill(src: &Source) -> Result<Self> {
        let Source {
            encode,
            proc,
            images,
            shape: (c, h, w),
            seed,
            device,
            ..
        } = *src;
        let _mode = clasp_core::model::grad_mode_guard(false);
        let plain = Augment {
            crop_scale: 1.0,
            jitter: None,
            seed,
        };
        let t0 = std::time::Instant::now();
        let mut rows: Vec<Option<Vec<f32>>> = Vec::with_capacity(images.len());
        let mut tail = Vec::new();
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
                let out = encode(&px)?;
                tail = out.dims()[1..].to_vec();
                pooled = out.flatten_from(1)?.to_vec2::<f32>()?.into_iter();
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
        Ok(Self { rows, tail })
    }

    /// [`Self::fill`] split over the ranks of `group`: rank r runs images r,
    /// r + world, r + 2·world, ...; every rank gets all the features.
    fn fill_shared(src: &Source, group: &dyn Collective) -> Result<Self> {
        let (w, r) = (group.world(), group.rank());
        let mine: Vec<ImageSource> = src.images.iter().skip(r).step_by(w).cloned().collect();
        let part = Self::fill(&Source {
            images: &mine,
            ..*src
        })?;
        // The feature shape, from any rank that read an image.
        let tail_f: Vec<f32> = part.tail.iter().map(|&d| d as f32).collect();
        let (tails, lens) = group.all_gather(&tail_f)?;
        let mut at = 0;
        let mut tail = Vec::new();
        for l in lens {
            if l > 0 && tail.is_empty() {
                tail = tails[at..at + l].iter().map(|&d| d as usize).collect();
            }
            at += l;
        }
        let dim: usize = tail.iter().product();
        // Each rank's rows: a validity flag per image, then the rows (zeros
        // where the image could not be read).
        let mut send: Vec<f32> = part.rows.iter().map(|x| x.is_some() as u8 as f32).collect();
        for row in &part.rows {
            match row {
                Some(v) => send.extend_from_slice(v),
                None => send.extend(std::iter::repeat_n(0f32, dim)),
            }
        }
        let (all, lens) = group.all_gather(&send)?;
        let n = src.images.len();
        let mut rows: Vec<Option<Vec<f32>>> = vec![None; n];
        let mut at = 0;
        for (q, len) in lens.into_iter().enumerate() {
            let block = &all[at..at + len];
            let count = (q..n).step_by(w).count();
            for (j, i) in (q..n).step_by(w).enumerate() {
                if block[j] == 1.0 {
                    let from = count + j * dim;
                    rows[i] = Some(block[from..from + dim].to_vec());
                }
            }
            at += len;
        }
        Ok(Self { rows, tail })
    }

    /// Values per image.
    fn dim(&self) -> usize {
        self.tail.iter().product()
    }

    /// Whether image `i` has cached features.
    pub fn has(&self, i: usize) -> bool {
        self.rows.get(i).is_some_and(Option::is_some)
    }

    /// The cached features of these images as one [B, ...] tensor.
    pub fn batch(&self, images: &[usize], device: &Device) -> Result<Tensor> {
        let mut flat = Vec::with_capacity(images.len() * self.dim());
        for &i in images {
            let row =
                self.rows.get(i).and_then(Option::as_ref).ok_or_else(|| {
                    crate::Error::Report(format!("image {i} has no cached features"))
                })?;
            flat.extend_from_slice(row);
        }
        let shape = [&[images.len()][..], &self.tail].concat();
        Ok(Tensor::from_vec(flat, shape, device)?)
    }
}
