//! Embedding output files: .npy, .jsonl, .safetensors; all written atomically
//! (a temporary file in the same directory, then rename).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

#[derive(Default)]
pub struct Embedded {
    pub model: String,
    pub dim: usize,
    pub images: Vec<Vec<f32>>,
    pub image_inputs: Vec<String>,
    pub texts: Vec<Vec<f32>>,
    pub text_inputs: Vec<String>,
}

fn matrix(rows: &[Vec<f32>], dim: usize) -> Result<Tensor> {
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (rows.len(), dim), &Device::Cpu)?)
}

/// Checks, before any work, that `path` can be written: its folder exists
/// and takes a new file. `-` (stdout) always can.
pub fn check_output(path: &Path) -> Result<()> {
    if path == Path::new("-") {
        return Ok(());
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        anyhow::bail!(
            "{}: cannot write the output there: the folder {} does not exist",
            path.display(),
            dir.display()
        );
    }
    if path.is_dir() {
        anyhow::bail!("{}: is a folder; give a file name", path.display());
    }
    let probe = dir.join(format!(".clasp-write-check-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .with_context(|| format!("{}: cannot write the output there", path.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Writes to `path` through a temporary sibling and a rename, so a reader
/// never sees a half-written file.
fn atomic_write(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().context("output path has no file name")?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let r = write(&tmp)
        .with_context(|| format!("writing {}", path.display()))
        .and_then(|_| std::fs::rename(&tmp, path).with_context(|| format!("{}", path.display())));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// Writes the embeddings in the format the extension names; `-` is JSON lines
/// on stdout. Returns the files written.
pub fn write_embeddings(path: &Path, e: &Embedded) -> Result<Vec<PathBuf>> {
    if path == Path::new("-") {
        let stdout = std::io::stdout();
        write_jsonl(&mut stdout.lock(), e)?;
        return Ok(vec![]);
    }
    let ext = path.extension().and_then(|x| x.to_str()).unwrap_or("");
    let mut written = Vec::new();
    match ext {
        "npy" => {
            let stem = path.with_extension("");
            for (kind, rows, inputs) in [
                ("image", &e.images, &e.image_inputs),
                ("text", &e.texts, &e.text_inputs),
            ] {
                if rows.is_empty() {
                    continue;
                }
                let p = PathBuf::from(format!("{}.{kind}.npy", stem.display()));
                let m = matrix(rows, e.dim)?;
                atomic_write(&p, |t| Ok(m.write_npy(t)?))?;
                written.push(p);
                if kind == "image" {
                    // Which file each row came from (failed files have no row).
                    let p = PathBuf::from(format!("{}.image.paths.txt", stem.display()));
                    let body: String = inputs.iter().map(|s| format!("{s}\n")).collect();
                    atomic_write(&p, |t| Ok(std::fs::write(t, body)?))?;
                    written.push(p);
                }
            }
        }
        "jsonl" => {
            atomic_write(path, |t| {
                let mut f = std::io::BufWriter::new(std::fs::File::create(t)?);
                write_jsonl(&mut f, e)?;
                Ok(f.flush()?)
            })?;
            written.push(path.to_path_buf());
        }
        "safetensors" => {
            let mut tensors = HashMap::new();
            if !e.images.is_empty() {
                tensors.insert("image_embeds".to_string(), matrix(&e.images, e.dim)?);
            }
            if !e.texts.is_empty() {
                tensors.insert("text_embeds".to_string(), matrix(&e.texts, e.dim)?);
            }
            let meta = HashMap::from([
                ("model".to_string(), e.model.clone()),
                (
                    "image_inputs".to_string(),
                    serde_json::to_string(&e.image_inputs)?,
                ),
                ("texts".to_string(), serde_json::to_string(&e.text_inputs)?),
            ]);
            atomic_write(path, |t| {
                Ok(safetensors::serialize_to_file(
                    tensors.iter().map(|(k, v)| (k.as_str(), v)),
                    Some(meta),
                    t,
                )?)
            })?;
            written.push(path.to_path_buf());
        }
        other => bail!(
            "{}: unknown output format `.{other}`; use .npy, .jsonl or .safetensors",
            path.display()
        ),
    }
    Ok(written)
}

fn write_jsonl(w: &mut impl Write, e: &Embedded) -> Result<()> {
    for (kind, rows, inputs) in [
        ("image", &e.images, &e.image_inputs),
        ("text", &e.texts, &e.text_inputs),
    ] {
        for (row, input) in rows.iter().zip(inputs.iter()) {
            let line = serde_json::json!({"type": kind, "input": input, "embedding": row});
            writeln!(w, "{line}")?;
        }
    }
    Ok(())
}
