//! Embedding many inputs: image files prepared a batch ahead with each unreadable one reported and skipped, texts in batches, and the list of images a `--images-from` folder or list file names.

use super::*;

/// Hashes `files` (config and weights), then the tokenizer files in `dir`
/// that exist, each under its name: the content a model's vectors depend on.
pub fn hash_model_files(h: &mut blake3::Hasher, files: &[&Path], dir: &Path) -> Result<()> {
    fn hash_file(h: &mut blake3::Hasher, path: &Path) -> Result<()> {
        let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        h.update_reader(f).map_err(|e| Error::io(path, e))?;
        Ok(())
    }
    for p in files {
        hash_file(h, p)?;
    }
    for name in [
        "tokenizer.json",
        "vocab.json",
        "merges.txt",
        "vocab.txt",
        "spiece.model",
    ] {
        let p = dir.join(name);
        if p.is_file() {
            h.update(name.as_bytes());
            hash_file(h, &p)?;
        }
    }
    Ok(())
}

impl Encoder {
    /// Embeds image files in batches, decoding in parallel. Files that fail to
    /// load are reported, and the rest are still embedded. `progress` is called
    /// with the number of inputs finished after each batch.
    pub fn embed_image_files(
        &self,
        paths: &[PathBuf],
        batch_size: usize,
        progress: impl FnMut(usize),
    ) -> Result<BatchEmbeddings> {
        let sources: Vec<crate::data::ImageSource> = paths
            .iter()
            .cloned()
            .map(crate::data::ImageSource::File)
            .collect();
        self.embed_image_sources(&sources, batch_size, progress)
    }

    /// [`Self::embed_image_files`] for a dataset's images (files, inline
    /// bytes or shard members).
    pub fn embed_image_sources(
        &self,
        sources: &[crate::data::ImageSource],
        batch_size: usize,
        mut progress: impl FnMut(usize),
    ) -> Result<BatchEmbeddings> {
        let paths = sources;
        let mut out = BatchEmbeddings {
            embeddings: Vec::with_capacity(paths.len()),
            indices: Vec::with_capacity(paths.len()),
            failures: Vec::new(),
        };
        let jobs: Vec<usize> = (0..paths.len()).collect();
        crate::preprocess::pipeline::prepare_ahead(
            crate::preprocess::pipeline::batches(jobs, batch_size),
            |_, _, &i| {
                use crate::preprocess::image::{decode_image, load_image};
                let img = match &paths[i] {
                    crate::data::ImageSource::File(p) => load_image(p)?,
                    src => decode_image(&src.read()?, &src.path())?,
                };
                self.image_processor.process_pixels(&img)
            },
            |batch| {
                let n = batch.len();
                let (ok, pixels, failed) = crate::preprocess::pipeline::partition(batch);
                out.failures.extend(
                    failed
                        .into_iter()
                        .map(|(index, error)| Failure { index, error }),
                );
                if !pixels.is_empty() {
                    let emb = self.embed_pixel_items(&pixels)?;
                    out.embeddings.extend(emb.to_vec2::<f32>()?);
                    out.indices.extend(ok);
                }
                progress(n);
                Ok(true)
            },
        )?;
        Ok(out)
    }

    /// Embeds texts in batches.
    pub fn embed_text_batches<S: AsRef<str> + Sync>(
        &self,
        texts: &[S],
        batch_size: usize,
        mut progress: impl FnMut(usize),
    ) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(batch_size.max(1)) {
            out.extend(self.embed_texts(chunk)?.to_vec2::<f32>()?);
            progress(chunk.len());
        }
        Ok(out)
    }
}

/// Runs a forward pass on one of rayon's workers. Its CPU kernels are then
/// joins that the other workers steal from, instead of jobs injected from
/// this thread one by one, each waited for with a sleep and a wake: for a
/// one-text forward (some 70 kernels of a few microseconds) those thread
/// switches were a third of the time.
pub(super) fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// Expands `--images-from`: a directory (its image files, sorted) or a list
/// file with one path per line (relative paths are taken from the list's
/// directory).
pub fn image_inputs_from(src: &Path) -> Result<Vec<PathBuf>> {
    if src.is_dir() {
        let (files, skipped) = crate::data::files::list_image_files(src)?;
        if files.is_empty() {
            return Err(Error::NoImages {
                path: src.to_path_buf(),
                skipped,
            });
        }
        return Ok(files);
    }
    let text = std::fs::read_to_string(src).map_err(|e| Error::io(src, e))?;
    let base = src.parent().unwrap_or(Path::new("."));
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| {
            let p = Path::new(l);
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        })
        .collect())
}
