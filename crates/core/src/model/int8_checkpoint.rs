//! Quantized checkpoints (`clasp quantize`): a model directory whose
//! `model.safetensors` holds the towers' transformer linears in int8, so that
//! loading reads them as they are instead of quantizing again.
//!
//! The format is the Hugging Face layout with one change: for every linear
//! that `--precision int8` quantizes (q, k, v, out, fc1, fc2 of each layer),
//! - `NAME.weight` is `I8` [out, in], each value in -127..=127;
//! - `NAME.weight_scale` is `F32` [out], one scale per output channel,
//!   so that the f32 weight is `weight[o, i] * weight_scale[o]`.
//!
//! Every other tensor is kept as it was. The file's metadata has
//! `"clasp.quantization": "int8-per-channel-symmetric"`. transformers does not
//! load this file; clasp does, with the same vectors as `--precision int8` on
//! the original.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use safetensors::{Dtype, SafeTensors};

use super::int8::QuantMatrix;
use super::{loader, Model, ModelFiles};
use crate::{Error, Result};

/// The metadata key and value that mark a quantized checkpoint.
pub const METADATA_KEY: &str = "clasp.quantization";
pub const METADATA_VALUE: &str = "int8-per-channel-symmetric";
const SCALE_SUFFIX: &str = "_scale";

fn bad(path: &Path, reason: impl std::fmt::Display) -> Error {
    Error::Weights {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Whether `weights` is a quantized checkpoint's safetensors file.
pub fn is_quantized(weights: &Path) -> Result<bool> {
    if weights.extension().is_none_or(|e| e != "safetensors") {
        return Ok(false);
    }
    let bytes = mmap(weights)?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(weights, e))?;
    Ok(meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(METADATA_KEY))
        .is_some_and(|v| v == METADATA_VALUE))
}

fn mmap(path: &Path) -> Result<memmap2::Mmap> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: read-only map of a checkpoint, which clasp never writes in
    // place (writes go to a temporary folder that is renamed into place).
    unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(path, e))
}

/// Reads a quantized checkpoint: every tensor as f32 (int8 weights
/// dequantized, so the model builds as usual), and the int8 weights by
/// layer name.
pub fn read(weights: &Path) -> Result<(HashMap<String, Tensor>, HashMap<String, QuantMatrix>)> {
    let bytes = mmap(weights)?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(weights, e))?;
    let mut tensors = HashMap::new();
    let mut int8 = HashMap::new();
    for (name, view) in st.tensors() {
        if name.ends_with(SCALE_SUFFIX) && st.tensor(name.trim_end_matches(SCALE_SUFFIX)).is_ok() {
            continue; // read with its weight
        }
        if view.dtype() == Dtype::I8 {
            let scale_name = format!("{name}{SCALE_SUFFIX}");
            let scale = st
                .tensor(&scale_name)
                .map_err(|_| bad(weights, format!("int8 tensor {name} has no {scale_name}")))?;
            let (n, k) = match view.shape() {
                [n, k] => (*n, *k),
                s => return Err(bad(weights, format!("int8 tensor {name} has shape {s:?}"))),
            };
            if scale.dtype() != Dtype::F32 || scale.shape() != [n] {
                return Err(bad(weights, format!("{scale_name} is not F32 [{n}]")));
            }
            let q: Vec<i8> = view.data().iter().map(|&b| b as i8).collect();
            let s: Vec<f32> = scale
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let m = QuantMatrix::from_int8(&q, s, n, k)
                .map_err(|e| bad(weights, format!("{name}: {e}")))?;
            let deq = Tensor::from_vec(m.dequantize(), (n, k), &Device::Cpu)?;
            tensors.insert(name.clone(), deq);
            let layer = name.strip_suffix(".weight").unwrap_or(&name).to_string();
            int8.insert(layer, m);
        } else {
            let t = candle_core::safetensors::Load::load(&view, &Device::Cpu)
                .map_err(|e| bad(weights, format!("{name}: {e}")))?;
            tensors.insert(name.clone(), t.to_dtype(DType::F32)?);
        }
    }
    Ok((tensors, int8))
}

/// What [`save`] wrote.
#[derive(Debug)]
pub struct Saved {
    pub quantized: usize,
    pub kept: usize,
    pub bytes_before: u64,
    pub bytes_after: u64,
}

/// Writes `files`' checkpoint to `out` with `model`'s int8 linears (see the
/// module docs); the folder appears whole or not at all.
pub fn save(files: &ModelFiles, model: &Model, out: &Path) -> Result<Saved> {
    let tensors: HashMap<String, Tensor> = if files.weights.extension().is_some_and(|e| e == "bin")
    {
        candle_core::pickle::read_all(&files.weights)
            .map_err(|e| bad(&files.weights, e))?
            .into_iter()
            .collect()
    } else {
        candle_core::safetensors::load(&files.weights, &Device::Cpu)
            .map_err(|e| bad(&files.weights, e))?
    };
    let mut linears: HashMap<String, QuantMatrix> = HashMap::new();
    for l in model.int8_linears() {
        let Some(name) = l.name() else { continue };
        let key = format!("{name}.weight");
        if tensors.contains_key(&key) {
            linears.insert(key, l.int8_weights(&|_| Ok(None))?);
        }
    }
    // Owned bytes for every tensor to write, by name, in name order.
    let mut blobs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut kept = 0;
    for name in names {
        let t = &tensors[name];
        if let Some(q) = linears.get(name) {
            let data = q.to_int8().into_iter().map(|v| v as u8).collect();
            blobs.push((name.clone(), Dtype::I8, vec![q.rows(), q.cols()], data));
            let scales = q.scales().iter().flat_map(|s| s.to_le_bytes()).collect();
            blobs.push((
                format!("{name}{SCALE_SUFFIX}"),
                Dtype::F32,
                vec![q.rows()],
                scales,
            ));
        } else {
            let t = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let data = t.iter().flat_map(|v| v.to_le_bytes()).collect();
            blobs.push((
                name.clone(),
                Dtype::F32,
                tensors[name].dims().to_vec(),
                data,
            ));
            kept += 1;
        }
    }
    let views = blobs
        .iter()
        .map(|(n, d, s, b)| {
            safetensors::tensor::TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Report(format!("{n}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([
        (METADATA_KEY.to_string(), METADATA_VALUE.to_string()),
        ("format".to_string(), "pt".to_string()),
    ]);
    crate::atomic::write_dir(out, |dir| {
        let w = dir.join("model.safetensors");
        safetensors::serialize_to_file(views, Some(meta), &w).map_err(|e| bad(&w, e))?;
        let copy = |from: &Path, name: &str| -> Result<()> {
            std::fs::copy(from, dir.join(name)).map_err(|e| Error::io(from, e))?;
            Ok(())
        };
        copy(&files.config, "config.json")?;
        for name in loader::SIDE_FILES {
            let p = files.dir.join(name);
            if p.is_file() {
                copy(&p, name)?;
            }
        }
        Ok(())
    })?;
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    Ok(Saved {
        quantized: linears.len(),
        kept,
        bytes_before: size(&files.weights),
        bytes_after: size(&out.join("model.safetensors")),
    })
}
