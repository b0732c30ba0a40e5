//! Embedding dataset items through the cache: look every item up, embed only
//! the misses (in batches, decoding in parallel), and store them.

use rayon::prelude::*;

use super::cache::{self, EmbeddingCache, Key};
use crate::data::ImageSource;
use crate::preprocess::image::decode_image;
use crate::preprocess::pipeline;
use crate::progress::Progress;
use crate::{Encoder, Error, Result};

/// Where embeddings come from and go.
pub struct EmbedContext<'a> {
    pub encoder: &'a Encoder,
    pub cache: Option<&'a mut EmbeddingCache>,
    /// The model's content hash (needed with a cache).
    pub model_key: Option<Key>,
    pub batch_size: usize,
    pub progress: &'a dyn Progress,
}

/// Image embeddings, or the error of each image that failed.
pub struct ImageEmbeddings {
    pub vectors: Vec<Option<Vec<f32>>>,
    pub failures: Vec<(usize, Error)>,
    pub cache_hits: usize,
}

impl EmbedContext<'_> {
    fn model_key(&mut self) -> Result<Key> {
        if let Some(k) = self.model_key {
            return Ok(k);
        }
        let k = self.encoder.content_hash()?;
        self.model_key = Some(k);
        Ok(k)
    }

    pub fn images(&mut self, sources: &[ImageSource]) -> Result<ImageEmbeddings> {
        let space = match self.cache {
            Some(_) => Some(cache::image_space(&self.model_key()?, self.encoder)),
            None => None,
        };
        self.progress.start("images", sources.len() as u64);
        let mut out = ImageEmbeddings {
            vectors: vec![None; sources.len()],
            failures: Vec::new(),
            cache_hits: 0,
        };
        let bs = self.batch_size.max(1);
        let proc = self.encoder.image_processor();
        // Work in chunks so memory stays bounded and the cache fills as we go
        // (an interrupted run keeps what it finished).
        let chunk = bs * 8;
        for (c, srcs) in sources.chunks(chunk).enumerate() {
            let base = c * chunk;
            let bytes: Vec<Result<std::sync::Arc<[u8]>>> =
                srcs.par_iter().map(|s| s.read()).collect();
            let keys: Vec<Option<Key>> = bytes
                .par_iter()
                .map(|b| b.as_ref().ok().map(|b| cache::content_key(b)))
                .collect();
            let mut todo = Vec::new();
            let mut bytes_ok = Vec::new();
            for (i, b) in bytes.into_iter().enumerate() {
                match b {
                    Ok(b) => bytes_ok.push((i, b)),
                    Err(e) => out.failures.push((base + i, e)),
                }
            }
            if let (Some(cache), Some(space)) = (self.cache.as_deref(), space.as_ref()) {
                let ks: Vec<Key> = bytes_ok.iter().map(|(i, _)| keys[*i].unwrap()).collect();
                let hits = cache.get_many(space, &ks)?;
                let mut chunk_hits = 0;
                for ((i, b), hit) in bytes_ok.into_iter().zip(hits) {
                    match hit {
                        Some(v) => {
                            out.vectors[base + i] = Some(v);
                            chunk_hits += 1;
                        }
                        None => todo.push((i, b)),
                    }
                }
                out.cache_hits += chunk_hits;
                self.progress.inc(chunk_hits as u64);
            } else {
                todo = bytes_ok;
            }
            let mut fresh: Vec<(Key, Vec<f32>)> = Vec::new();
            let (encoder, progress) = (self.encoder, self.progress);
            pipeline::prepare_ahead(
                pipeline::batches(todo, bs),
                |_, _, (i, b): &(usize, std::sync::Arc<[u8]>)| {
                    proc.process_pixels(&decode_image(b, &srcs[*i].path())?)
                },
                |batch| {
                    let n = batch.len();
                    let (ok, pixels, failed) = pipeline::partition(batch);
                    out.failures
                        .extend(failed.into_iter().map(|((i, _), e)| (base + i, e)));
                    if !pixels.is_empty() {
                        let emb = encoder.embed_pixel_items(&pixels)?.to_vec2::<f32>()?;
                        for ((i, _), v) in ok.into_iter().zip(emb) {
                            if let Some(k) = keys[i] {
                                fresh.push((k, v.clone()));
                            }
                            out.vectors[base + i] = Some(v);
                        }
                    }
                    progress.inc(n as u64);
                    Ok(true)
                },
            )?;
            if let (Some(cache), Some(space)) = (self.cache.as_deref_mut(), space.as_ref()) {
                cache.put_many(space, &fresh)?;
            }
        }
        self.progress.finish();
        out.failures.sort_by_key(|f| f.0);
        Ok(out)
    }

    pub fn texts(&mut self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        let space = match self.cache {
            Some(_) => Some(cache::text_space(&self.model_key()?, self.encoder)),
            None => None,
        };
        self.progress.start("texts", texts.len() as u64);
        let keys: Vec<Key> = texts
            .par_iter()
            .map(|t| cache::content_key(t.as_bytes()))
            .collect();
        let mut vectors: Vec<Option<Vec<f32>>> = match (self.cache.as_deref(), space.as_ref()) {
            (Some(c), Some(s)) => c.get_many(s, &keys)?,
            _ => vec![None; texts.len()],
        };
        let hits = vectors.iter().filter(|v| v.is_some()).count();
        self.progress.inc(hits as u64);
        let todo: Vec<usize> = (0..texts.len()).filter(|&i| vectors[i].is_none()).collect();
        let bs = self.batch_size.max(1);
        for group in todo.chunks(bs * 8) {
            let mut fresh = Vec::new();
            for batch in group.chunks(bs) {
                let strs: Vec<&str> = batch.iter().map(|&i| texts[i].as_str()).collect();
                let emb = self.encoder.embed_texts(&strs)?.to_vec2::<f32>()?;
                for (&i, v) in batch.iter().zip(emb) {
                    fresh.push((keys[i], v.clone()));
                    vectors[i] = Some(v);
                }
                self.progress.inc(batch.len() as u64);
            }
            if let (Some(cache), Some(space)) = (self.cache.as_deref_mut(), space.as_ref()) {
                cache.put_many(space, &fresh)?;
            }
        }
        self.progress.finish();
        Ok(vectors
            .into_iter()
            .map(|v| v.expect("every text embedded"))
            .collect())
    }
}
