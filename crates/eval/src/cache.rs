//! The embedding cache: a SQLite table of vectors keyed by what determines
//! them. An image vector's key is (model content hash, preprocessing, image
//! content hash); a text vector's is (model content hash, text). A changed
//! image file or model gets new keys, so stale entries are never read.

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};

use crate::{Encoder, Error, Result};

pub type Key = [u8; 32];

pub struct EmbeddingCache {
    conn: Connection,
    path: PathBuf,
}

fn err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Cache {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

impl EmbeddingCache {
    /// The default location: `$CLASP_CACHE_DIR`, else the platform cache dir.
    pub fn default_path() -> PathBuf {
        clasp_common::cache_root().join("embeddings.sqlite")
    }

    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let conn = Connection::open(path).map_err(|e| err(path, e))?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous=NORMAL;
             CREATE TABLE IF NOT EXISTS embeddings (
                 space BLOB NOT NULL,
                 item BLOB NOT NULL,
                 vector BLOB NOT NULL,
                 PRIMARY KEY (space, item)
             ) WITHOUT ROWID;",
        )
        .map_err(|e| err(path, e))?;
        Ok(Self {
            conn,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Looks up vectors of `items` in `space`.
    pub fn get_many(&self, space: &Key, items: &[Key]) -> Result<Vec<Option<Vec<f32>>>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT vector FROM embeddings WHERE space = ?1 AND item = ?2")
            .map_err(|e| err(&self.path, e))?;
        items
            .iter()
            .map(|k| {
                let blob: Option<Vec<u8>> = stmt
                    .query_row(params![&space[..], &k[..]], |r| r.get(0))
                    .optional()
                    .map_err(|e| err(&self.path, e))?;
                Ok(blob.map(|b| {
                    b.chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect()
                }))
            })
            .collect()
    }

    /// Stores vectors in one transaction (all or none on interruption).
    pub fn put_many(&mut self, space: &Key, items: &[(Key, Vec<f32>)]) -> Result<()> {
        let tx = self.conn.transaction().map_err(|e| err(&self.path, e))?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO embeddings (space, item, vector) VALUES (?1, ?2, ?3)",
                )
                .map_err(|e| err(&self.path, e))?;
            for (k, v) in items {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                stmt.execute(params![&space[..], &k[..], bytes])
                    .map_err(|e| err(&self.path, e))?;
            }
        }
        tx.commit().map_err(|e| err(&self.path, e))
    }
}

/// The key space of image vectors: model and preprocessing.
pub fn image_space(model: &Key, enc: &Encoder) -> Key {
    let mut h = blake3::Hasher::new();
    h.update(b"image\0");
    h.update(model);
    h.update(&enc.image_processor().config().key_bytes());
    *h.finalize().as_bytes()
}

/// The key space of text vectors: model and context length.
pub fn text_space(model: &Key, enc: &Encoder) -> Key {
    let mut h = blake3::Hasher::new();
    h.update(b"text\0");
    h.update(model);
    h.update(&(enc.tokenizer().context_length() as u64).to_le_bytes());
    *h.finalize().as_bytes()
}

pub fn content_key(bytes: &[u8]) -> Key {
    *blake3::hash(bytes).as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_space_key_is_versioned_and_sees_every_field() {
        use crate::preprocess::image::{ImageProcessorConfig, ResizeTo};
        let base = ImageProcessorConfig::clip_default(224);
        let k = base.key_bytes();
        assert!(k.starts_with(b"clasp-image-processor-v3\0"));
        assert_eq!(k, ImageProcessorConfig::clip_default(224).key_bytes());
        type Change = Box<dyn Fn(&mut ImageProcessorConfig)>;
        let variants: Vec<Change> = vec![
            Box::new(|c| c.do_convert_rgb = !c.do_convert_rgb),
            Box::new(|c| c.do_resize = !c.do_resize),
            Box::new(|c| {
                c.resize = ResizeTo::Exact {
                    height: 224,
                    width: 224,
                }
            }),
            Box::new(|c| c.do_center_crop = !c.do_center_crop),
            Box::new(|c| c.crop = (224, 225)),
            Box::new(|c| c.do_rescale = !c.do_rescale),
            Box::new(|c| c.rescale_factor = 1.0 / 256.0),
            Box::new(|c| c.do_normalize = !c.do_normalize),
            Box::new(|c| c.mean[2] += 1e-9),
            Box::new(|c| c.std[0] += 1e-9),
            Box::new(|c| c.resample = crate::preprocess::resample::Filter::Bilinear),
            Box::new(|c| {
                c.resize = ResizeTo::PatchBudget {
                    patch: 16,
                    max_patches: 196,
                }
            }),
            Box::new(|c| {
                c.resize = ResizeTo::PixelBudget {
                    factor: 8,
                    min_pixels: 96 * 96,
                    max_pixels: 128 * 128,
                }
            }),
        ];
        for (i, change) in variants.iter().enumerate() {
            let mut c = ImageProcessorConfig::clip_default(224);
            change(&mut c);
            assert_ne!(c.key_bytes(), k, "field change {i} not in the key");
        }
    }

    #[test]
    fn roundtrip_and_miss() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.sqlite");
        let space = content_key(b"space");
        let (a, b) = (content_key(b"a"), content_key(b"b"));
        {
            let mut c = EmbeddingCache::open(&p).unwrap();
            c.put_many(&space, &[(a, vec![1.0, -2.5])]).unwrap();
        }
        let c = EmbeddingCache::open(&p).unwrap();
        let got = c.get_many(&space, &[a, b]).unwrap();
        assert_eq!(got, vec![Some(vec![1.0, -2.5]), None]);
        // Another space does not see it.
        assert_eq!(
            c.get_many(&content_key(b"other"), &[a]).unwrap(),
            vec![None]
        );
    }
}
