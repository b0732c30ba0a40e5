//! PyTorch's `torch.save` files (`.pth`, `.pt`, `.bin`) read as a state dict,
//! in both of its formats:
//!
//! - the zip archive torch has written since 1.6 (`data.pkl` and one file per
//!   storage), read by candle's `pickle` module;
//! - the legacy format before it (torchvision's published ImageNet weights
//!   are in it): five pickles and raw storages back to back in one stream.
//!   candle reads only the zip format, so the legacy stream is walked here
//!   with candle's pickle machine (`Stack`) for the pickles.
//!
//! A dict holding the weights under `state_dict` or `model` (open_clip's
//! `epoch_N.pt`, many training scripts) is looked into, and the
//! `module.` prefix that `DistributedDataParallel` adds is removed.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use candle_core::pickle::{Object, Stack, TensorInfo};
use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

fn werr(path: &Path, reason: impl std::fmt::Display) -> Error {
    Error::Weights {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// The keys under which checkpoints written by training scripts keep the
/// model's weights, tried in order when the top level is not a state dict.
const NESTED_KEYS: &[&str] = &["state_dict", "model", "model_state_dict"];

/// Every tensor of a `torch.save` file (either format) or a safetensors
/// file, by name, as f32 on the CPU. Integer tensors (BatchNorm's
/// `num_batches_tracked`) are left out.
pub fn read_state_dict(path: &Path) -> Result<HashMap<String, Tensor>> {
    let mut head = [0u8; 4];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .map_err(|e| Error::io(path, e))?;
    let raw: Vec<(String, Tensor)> = if path.extension().is_some_and(|e| e == "safetensors") {
        candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| werr(path, e))?
            .into_iter()
            .collect()
    } else if n >= 4 && &head == b"PK\x03\x04" {
        match read_torchscript(path)? {
            Some(t) => t,
            None => read_zip(path)?,
        }
    } else if n >= 2 && head[0] == 0x80 {
        read_legacy(path)?
    } else {
        return Err(werr(
            path,
            "neither a torch.save file (zip or legacy pickle) nor safetensors",
        ));
    };
    let prefixed = !raw.is_empty() && raw.iter().all(|(k, _)| k.starts_with("module."));
    let mut out = HashMap::with_capacity(raw.len());
    for (k, t) in raw {
        if !t.dtype().is_float() {
            continue;
        }
        let k = if prefixed {
            k["module.".len()..].to_string()
        } else {
            k
        };
        out.insert(k, t.to_dtype(DType::F32).map_err(|e| werr(path, e))?);
    }
    if out.is_empty() {
        return Err(werr(path, "no floating-point tensors in this file"));
    }
    Ok(out)
}

fn read_zip(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let mut last = None;
    for key in std::iter::once(None).chain(NESTED_KEYS.iter().map(|k| Some(*k))) {
        match candle_core::pickle::read_all_with_key(path, key) {
            Ok(t) if !t.is_empty() => return Ok(t),
            Ok(_) => {}
            Err(e) => last = Some(e),
        }
    }
    Err(werr(
        path,
        match last {
            Some(e) => format!("no state dict found ({e})"),
            None => "no tensors found at the top level nor under state_dict/model".into(),
        },
    ))
}

/// A TorchScript archive (`torch.jit.save`, as OpenAI published CLIP's
/// `.pt` files): a zip whose `constants.pkl` marks it, and whose `data.pkl`
/// pickles the module tree as objects (`__torch__.*` classes) with their
/// attributes. The tensors are named by their attribute paths, which are
/// the module's `state_dict()` names. `None` when the zip is not one.
fn read_torchscript(path: &Path) -> Result<Option<Vec<(String, Tensor)>>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| werr(path, e))?;
    let names: Vec<String> = zip
        .file_names()
        .map(|n| n.map(|n| n.into_owned()))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| werr(path, e))?;
    let Some(pkl) = names
        .iter()
        .find(|n| {
            n.ends_with("/data.pkl") && names.contains(&n.replace("/data.pkl", "/constants.pkl"))
        })
        .cloned()
    else {
        return Ok(None);
    };
    let dir = pkl.trim_end_matches(".pkl").to_string();
    let root = {
        let mut r = BufReader::new(zip.by_name(&pkl).map_err(|e| werr(path, e))?);
        next_pickle(&mut r, path, "TorchScript module")?
    };
    let mut infos = Vec::new();
    walk_module(root, String::new(), &dir, &mut infos, 0).map_err(|e| werr(path, e))?;
    if infos.is_empty() {
        return Err(werr(path, "a TorchScript archive without tensors"));
    }
    let mut storages: HashMap<String, Tensor> = HashMap::new();
    let mut out = Vec::with_capacity(infos.len());
    for (name, ti) in infos {
        if !storages.contains_key(&ti.path) {
            let mut entry = zip
                .by_name(&ti.path)
                .map_err(|e| werr(path, format!("{name}: storage {}: {e}", ti.path)))?;
            let bytes = ti.storage_size * ti.dtype.size_in_bytes();
            if entry.size() < bytes as u64 {
                return Err(werr(
                    path,
                    format!("{name}: storage {} is cut short", ti.path),
                ));
            }
            let mut buf = vec![0u8; bytes];
            entry
                .read_exact(&mut buf)
                .map_err(|e| werr(path, format!("{name}: storage {}: {e}", ti.path)))?;
            let t = Tensor::from_raw_buffer(&buf, ti.dtype, &[ti.storage_size], &Device::Cpu)
                .map_err(|e| werr(path, e))?;
            storages.insert(ti.path.clone(), t);
        }
        let t = view(&storages[&ti.path], &ti).map_err(|e| werr(path, format!("{name}: {e}")))?;
        out.push((name, t));
    }
    Ok(Some(out))
}

/// Collects the tensors of a pickled TorchScript module object: its
/// attributes by name, recursing into submodules (objects of `__torch__`
/// classes), with `prefix` the attribute path so far.
fn walk_module(
    obj: Object,
    prefix: String,
    dir: &str,
    out: &mut Vec<(String, TensorInfo)>,
    depth: usize,
) -> std::result::Result<(), String> {
    if depth > 64 {
        return Err("TorchScript modules nested more than 64 deep".into());
    }
    let attrs = match obj {
        Object::Build { callable, args } => match (*callable, *args) {
            (Object::Reduce { callable, .. }, Object::Dict(items)) if matches!(&*callable, Object::Class { module_name, .. } if module_name.starts_with("__torch__")) => {
                items
            }
            _ => return Ok(()),
        },
        _ => return Ok(()),
    };
    for (k, v) in attrs {
        let Object::Unicode(name) = &k else { continue };
        let full = format!("{prefix}{name}");
        if matches!(&v, Object::Build { .. }) {
            walk_module(v, format!("{full}."), dir, out, depth + 1)?;
        } else if let Ok(Some(ti)) =
            v.into_tensor_info(Object::Unicode(full.clone()), Path::new(dir))
        {
            out.push((full, ti));
        }
    }
    Ok(())
}

/// One pickle from the stream.
fn next_pickle(r: &mut impl BufRead, path: &Path, what: &str) -> Result<Object> {
    let mut s = Stack::empty();
    s.read_loop(r)
        .map_err(|e| werr(path, format!("reading the {what}: {e}")))?;
    s.finalize()
        .map_err(|e| werr(path, format!("reading the {what}: {e}")))
}

/// torch's legacy serialization (`_legacy_save`): the magic number, the
/// protocol version and a system-info dict (three pickles), the object
/// pickle whose tensors name their storages by persistent id, the sorted
/// list of storage keys (a pickle), then for each key its element count
/// (u64, little-endian) and its raw bytes.
fn read_legacy(path: &Path) -> Result<Vec<(String, Tensor)>> {
    // The magic number, pickled (protocol 2) as a 10-byte LONG1. Matched as
    // bytes: candle's pickle machine cannot hold a long this wide.
    const MAGIC: [u8; 15] = [
        0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, b'.',
    ];
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut r = BufReader::new(file);
    let mut magic = [0u8; 15];
    if r.read_exact(&mut magic).is_err() || magic != MAGIC {
        return Err(werr(
            path,
            "not a torch.save file (no legacy magic number, not a zip)",
        ));
    }
    match next_pickle(&mut r, path, "protocol version")?.int_or_long() {
        Ok(1001) => {}
        Ok(v) => {
            return Err(werr(
                path,
                format!("legacy torch protocol {v}, expected 1001"),
            ))
        }
        Err(o) => return Err(werr(path, format!("not a torch.save file (header {o:?})"))),
    }
    let sys_info = next_pickle(&mut r, path, "system info")?;
    if let Object::Dict(items) = &sys_info {
        let little = items
            .iter()
            .find(|(k, _)| *k == Object::Unicode("little_endian".into()))
            .map(|(_, v)| *v == Object::Bool(true));
        if little == Some(false) {
            return Err(werr(path, "written on a big-endian machine"));
        }
    }
    let obj = next_pickle(&mut r, path, "state dict")?;
    let infos = tensor_infos(obj, path)?;
    let keys: Vec<String> = match next_pickle(&mut r, path, "storage keys")? {
        Object::List(items) => items
            .into_iter()
            .map(|o| {
                o.unicode()
                    .map_err(|o| werr(path, format!("storage key {o:?}")))
            })
            .collect::<Result<_>>()?,
        o => {
            return Err(werr(
                path,
                format!("expected the storage key list, got {o:?}"),
            ))
        }
    };
    // Each storage's dtype comes from a tensor that views it.
    let dtypes: HashMap<&str, DType> = infos
        .iter()
        .map(|(_, ti)| (storage_key(ti), ti.dtype))
        .collect();
    let mut storages: HashMap<String, Tensor> = HashMap::with_capacity(keys.len());
    let mut consumed = 0u64;
    for key in &keys {
        let dtype = *dtypes
            .get(key.as_str())
            .ok_or_else(|| werr(path, format!("storage {key} is viewed by no tensor")))?;
        let mut count = [0u8; 8];
        r.read_exact(&mut count)
            .map_err(|e| werr(path, format!("storage {key}: {e}")))?;
        let numel = u64::from_le_bytes(count);
        let bytes = numel
            .checked_mul(dtype.size_in_bytes() as u64)
            .filter(|b| consumed.saturating_add(*b) <= file_len)
            .ok_or_else(|| {
                werr(
                    path,
                    format!("storage {key} claims {numel} elements, more than the file holds"),
                )
            })?;
        consumed += bytes + 8;
        let mut buf = vec![0u8; bytes as usize];
        r.read_exact(&mut buf)
            .map_err(|e| werr(path, format!("storage {key} is cut short: {e}")))?;
        let t = Tensor::from_raw_buffer(&buf, dtype, &[numel as usize], &Device::Cpu)
            .map_err(|e| werr(path, e))?;
        storages.insert(key.clone(), t);
    }
    infos
        .into_iter()
        .map(|(name, ti)| {
            let storage = storages
                .get(storage_key(&ti))
                .ok_or_else(|| werr(path, format!("{name}: storage {} missing", ti.path)))?;
            Ok((
                name.clone(),
                view(storage, &ti).map_err(|e| werr(path, format!("{name}: {e}")))?,
            ))
        })
        .collect()
}

/// The storage key a tensor info names (`into_tensor_info` prefixes it with
/// the zip folder, here empty).
fn storage_key(ti: &TensorInfo) -> &str {
    ti.path.trim_start_matches('/')
}

/// The tensors of a state dict object (looking under the nested keys).
fn tensor_infos(obj: Object, path: &Path) -> Result<Vec<(String, TensorInfo)>> {
    let Object::Dict(items) = obj else {
        return Err(werr(path, "the saved object is not a dict of tensors"));
    };
    let mut out = Vec::new();
    let mut nested = None;
    for (k, v) in items {
        if let Object::Unicode(name) = &k {
            if NESTED_KEYS.contains(&name.as_str()) && matches!(v, Object::Dict(_)) {
                nested.get_or_insert(v);
                continue;
            }
        }
        let name = match &k {
            Object::Unicode(n) => n.clone(),
            _ => continue,
        };
        if let Ok(Some(ti)) = v.into_tensor_info(k, Path::new("")) {
            out.push((name, ti));
        }
    }
    if out.is_empty() {
        if let Some(n) = nested {
            return tensor_infos(n, path);
        }
    }
    Ok(out)
}

/// A tensor's view of its storage from its offset: contiguous, or dense in
/// some other order of its dimensions (torch keeps a transposed or permuted
/// weight, as Fortran-ordered matrices or the channels-last convolutions of
/// a TensorFlow port, as its storage with permuted strides). Views that skip
/// or repeat elements are refused.
fn view(storage: &Tensor, ti: &TensorInfo) -> candle_core::Result<Tensor> {
    let l = &ti.layout;
    let dims = l.dims().to_vec();
    let numel: usize = dims.iter().product();
    let offset = l.start_offset() / ti.dtype.size_in_bytes();
    if offset + numel > storage.elem_count() {
        candle_core::bail!(
            "view of {numel} elements at {offset} overruns its storage of {}",
            storage.elem_count()
        );
    }
    let flat = storage.narrow(0, offset, numel)?;
    if l.is_contiguous() {
        return flat.reshape(dims);
    }
    let Some(order) = storage_order(&dims, l.stride()) else {
        candle_core::bail!(
            "strided tensors that are not dense are not supported ({:?})",
            l
        )
    };
    // The storage holds the dimensions in `order`; put them back.
    let stored: Vec<usize> = order.iter().map(|&d| dims[d]).collect();
    let perm: Vec<usize> = (0..dims.len())
        .map(|d| order.iter().position(|&o| o == d).expect("a permutation"))
        .collect();
    flat.reshape(stored)?.permute(perm)?.contiguous()
}

/// The order of `dims` (outermost first) in which `strides` lay them out
/// densely, or `None` when no order does. Size-1 dimensions' strides do not
/// matter.
fn storage_order(dims: &[usize], strides: &[usize]) -> Option<Vec<usize>> {
    if dims.len() != strides.len() {
        return None;
    }
    let mut order: Vec<usize> = (0..dims.len()).collect();
    order.sort_by_key(|&d| (std::cmp::Reverse(strides[d]), d));
    let mut expected = 1usize;
    for &d in order.iter().rev() {
        if dims[d] != 1 && strides[d] != expected {
            return None;
        }
        expected = expected.checked_mul(dims[d])?;
    }
    Some(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permuted_dense_strides_have_a_storage_order() {
        // Contiguous, Fortran order, a channels-last convolution, and a
        // size-1 dimension with any stride.
        assert_eq!(storage_order(&[2, 3], &[3, 1]), Some(vec![0, 1]));
        assert_eq!(storage_order(&[2, 3], &[1, 2]), Some(vec![1, 0]));
        assert_eq!(
            storage_order(&[1152, 1, 3, 3], &[1, 1, 3456, 1152]),
            Some(vec![2, 3, 0, 1])
        );
        // Skipping (every other element) or repeating (stride 0) is not dense.
        assert_eq!(storage_order(&[2, 3], &[6, 2]), None);
        assert_eq!(storage_order(&[2, 3], &[0, 1]), None);
    }

    /// A permuted view reads as the tensor it shows.
    #[test]
    fn a_permuted_view_reads_back_in_its_own_order() {
        let storage = Tensor::arange(0f32, 6.0, &Device::Cpu).unwrap();
        // The [3, 2] transpose of a [2, 3] storage: strides (1, 3).
        let ti = TensorInfo {
            name: "t".into(),
            dtype: DType::F32,
            layout: candle_core::Layout::new((3, 2).into(), vec![1, 3], 0),
            path: String::new(),
            storage_size: 6,
        };
        let t = view(&storage, &ti).unwrap();
        let want = storage.reshape((2, 3)).unwrap().t().unwrap();
        assert_eq!(t.to_vec2::<f32>().unwrap(), want.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn garbage_is_refused_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("w.pth");
        std::fs::write(&p, b"hello world").unwrap();
        let e = read_state_dict(&p).unwrap_err().to_string();
        assert!(e.contains("w.pth"), "{e}");
    }

    #[test]
    fn a_truncated_legacy_file_is_an_error_not_a_panic() {
        // Protocol-2 pickle of the int 3, then nothing.
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("w.pth");
        std::fs::write(&p, [0x80, 0x02, b'K', 3, b'.']).unwrap();
        assert!(read_state_dict(&p).is_err());
    }
}
