//! The model a store's vectors come from: a dual encoder (one vector per
//! image and per text, scored by their cosine), or BLIP-2's ITC
//! (`Blip2ForImageTextRetrieval`: one vector per text, N query vectors per
//! image, scored by the best query, as `Blip2ForImageTextRetrieval` with
//! `use_image_text_matching_head=False` scores a pair). An image's N vectors
//! are stored back to back as one row of N·D values, so both stores and the
//! exact engine keep them unchanged ([`crate::engine::row_score`]).

use std::path::{Path, PathBuf};

use clasp_core::model::blip2::Blip2Retrieval;
use clasp_core::preprocess::{ImageProcessor, Pixels};

use crate::encoder::Precision;
use crate::{Encoder, Error, Result};

/// What indexing and searching need of a model.
pub trait Embedder: Send + Sync {
    fn image_processor(&self) -> &ImageProcessor;
    /// The width of a text's vector, and of each of an image's.
    fn query_dim(&self) -> usize;
    /// Vectors per image: 1, or BLIP-2's number of queries.
    fn vectors_per_image(&self) -> usize {
        1
    }
    /// The width of a stored image row.
    fn stored_dim(&self) -> usize {
        self.query_dim() * self.vectors_per_image()
    }
    /// The stored rows of processed images (unit vectors; BLIP-2's queries
    /// each a unit vector).
    fn embed_images(&self, items: &[Pixels]) -> Result<Vec<Vec<f32>>>;
    /// A text's unit vector.
    fn embed_text(&self, text: &str) -> Result<Vec<f32>>;
    /// An image as a query, in the texts' space.
    fn embed_query_image(&self, path: &Path) -> Result<Vec<f32>>;
    /// The dual encoder, or an error naming what needs one.
    fn dual(&self, what: &str) -> Result<&Encoder>;
    /// The fusion model with an ITM head, when the model is one.
    fn fusion(&self) -> Option<&Blip2Retrieval> {
        None
    }
    /// The weights file (whose size and mtime key the remembered hash).
    fn weights(&self) -> PathBuf;
    fn precision(&self) -> Precision;
    /// The hash that keys the model's vectors in a store.
    fn content_hash(&self) -> Result<[u8; 32]>;
}

impl Embedder for Encoder {
    fn image_processor(&self) -> &ImageProcessor {
        Encoder::image_processor(self)
    }
    fn query_dim(&self) -> usize {
        self.embedding_dim()
    }
    fn embed_images(&self, items: &[Pixels]) -> Result<Vec<Vec<f32>>> {
        Ok(self.embed_pixel_items(items)?.to_vec2()?)
    }
    fn embed_text(&self, text: &str) -> Result<Vec<f32>> {
        Ok(self.embed_texts(&[text])?.get(0)?.to_vec1()?)
    }
    fn embed_query_image(&self, path: &Path) -> Result<Vec<f32>> {
        let px = Encoder::image_processor(self).process_path_pixels(path)?;
        Ok(self.embed_pixel_items(&[px])?.get(0)?.to_vec1()?)
    }
    fn dual(&self, _what: &str) -> Result<&Encoder> {
        Ok(self)
    }
    fn weights(&self) -> PathBuf {
        self.files().weights.clone()
    }
    fn precision(&self) -> Precision {
        Encoder::precision(self)
    }
    fn content_hash(&self) -> Result<[u8; 32]> {
        Encoder::content_hash(self)
    }
}

impl Embedder for Blip2Retrieval {
    fn image_processor(&self) -> &ImageProcessor {
        &self.processor
    }
    fn query_dim(&self) -> usize {
        self.itc_dim()
    }
    fn vectors_per_image(&self) -> usize {
        self.cfg.num_query_tokens
    }
    fn embed_images(&self, items: &[Pixels]) -> Result<Vec<Vec<f32>>> {
        self.embed_image_queries(items)
    }
    fn embed_text(&self, text: &str) -> Result<Vec<f32>> {
        Ok(self.text_embeds(&[text.to_string()])?.get(0)?.to_vec1()?)
    }
    /// BLIP-2's ITC scores texts against images, not images against images.
    fn embed_query_image(&self, path: &Path) -> Result<Vec<f32>> {
        Err(Error::Report(format!(
            "{}: a BLIP-2 model scores texts against images; a query with an image needs a dual \
             encoder as --model",
            path.display()
        )))
    }
    fn dual(&self, what: &str) -> Result<&Encoder> {
        Err(Error::Report(format!(
            "{what} needs a dual encoder as --model; a BLIP-2 folder searches images by text"
        )))
    }
    fn fusion(&self) -> Option<&Blip2Retrieval> {
        Some(self)
    }
    fn weights(&self) -> PathBuf {
        self.dir.join("model.safetensors")
    }
    fn precision(&self) -> Precision {
        Precision::F32
    }
    fn content_hash(&self) -> Result<[u8; 32]> {
        Blip2Retrieval::content_hash(self)
    }
}
