//! Reading GGUF files (v2 and v3): the header, the metadata and the tensors,
//! through candle's `quantized::gguf_file`, with errors that name the file and
//! the key or tensor at fault.
//!
//! candle parses the format; this file adds what a user needs around it: a
//! clear word for a file that is not GGUF at all, a truncated one, a tensor of
//! a type clasp does not run, or a missing metadata key, and typed access to
//! the metadata.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;

use crate::{Error, Result};

/// The tensor types clasp loads from GGUF. Others are refused at open time
/// with the tensor's name.
pub const SUPPORTED_TYPES: &[GgmlDType] = &[
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q8_0,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

const GGUF_MAGIC: &[u8; 4] = b"GGUF";

/// An open GGUF file: its parsed header and a reader for the tensor data.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: BufReader<File>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.content.tensor_infos.len())
            .finish()
    }
}

impl GgufFile {
    /// Opens and validates a GGUF file: magic, version, metadata, and that
    /// every tensor has a supported type and lies inside the file.
    pub fn open(path: &Path) -> Result<Self> {
        let err = |reason: String| Error::Gguf {
            path: path.to_path_buf(),
            reason,
        };
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut reader = BufReader::new(file);
        let mut magic = [0u8; 4];
        if file_len < 8 || reader.read_exact(&mut magic).is_err() {
            return Err(err(format!(
                "not a GGUF file: {file_len} bytes, too short for a header"
            )));
        }
        if &magic != GGUF_MAGIC {
            return Err(err(format!(
                "not a GGUF file: magic number {:?} where GGUF files start with \"GGUF\"",
                String::from_utf8_lossy(&magic)
            )));
        }
        reader
            .seek(SeekFrom::Start(0))
            .map_err(|e| Error::io(path, e))?;
        let content = Content::read(&mut reader).map_err(|e| {
            let msg = e.to_string();
            if let Some(code) = msg.strip_prefix("unknown dtype for tensor ") {
                err(format!(
                    "a tensor has GGML type {code}, which clasp cannot read (supported: {})",
                    supported_list()
                ))
            } else {
                err(format!("corrupt or truncated GGUF header/metadata: {msg}"))
            }
        })?;
        let mut names: Vec<&String> = content.tensor_infos.keys().collect();
        names.sort();
        for name in names {
            let info = &content.tensor_infos[name];
            if !SUPPORTED_TYPES.contains(&info.ggml_dtype) {
                return Err(err(format!(
                    "tensor `{name}` has type {:?}, which clasp does not run (supported: {})",
                    info.ggml_dtype,
                    supported_list()
                )));
            }
            // Checked: a crafted header's dimensions can overflow their
            // product (found by fuzzing), which would wrap in a release build.
            let elems = info
                .shape
                .dims()
                .iter()
                .try_fold(1usize, |n, &d| n.checked_mul(d))
                .ok_or_else(|| {
                    err(format!(
                        "tensor `{name}`: its shape {:?} has more elements than fit in memory",
                        info.shape.dims()
                    ))
                })?;
            let block = info.ggml_dtype.block_size();
            if elems % block != 0 {
                return Err(err(format!(
                    "tensor `{name}`: {elems} elements is not a whole number of {:?} blocks of {block}",
                    info.ggml_dtype
                )));
            }
            let bytes = (elems / block)
                .checked_mul(info.ggml_dtype.type_size())
                .ok_or_else(|| err(format!("tensor `{name}`: its size overflows")))?
                as u64;
            let end = content
                .tensor_data_offset
                .saturating_add(info.offset)
                .saturating_add(bytes);
            if end > file_len {
                return Err(err(format!(
                    "truncated: tensor `{name}` ends at byte {end}, but the file has {file_len} bytes"
                )));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            content,
            reader,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn content(&self) -> &Content {
        &self.content
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// The type a tensor is stored in.
    pub fn tensor_type(&self, name: &str) -> Option<GgmlDType> {
        self.content.tensor_infos.get(name).map(|i| i.ggml_dtype)
    }

    /// Reads one tensor, still quantized.
    pub fn tensor(&mut self, name: &str, device: &Device) -> Result<QTensor> {
        if !self.has_tensor(name) {
            return Err(self.error(format!("missing tensor `{name}`")));
        }
        let path = self.path.clone();
        self.content
            .tensor(&mut self.reader, name, device)
            .map_err(|e| Error::Gguf {
                path,
                reason: format!("tensor `{name}`: {e}"),
            })
    }

    /// One tensor's raw bytes, in the file's block layout, with its type and
    /// shape (`[rows, cols]` order, as candle reports GGUF shapes).
    pub fn raw(&mut self, name: &str) -> Result<(GgmlDType, Vec<usize>, Vec<u8>)> {
        let Some(info) = self.content.tensor_infos.get(name) else {
            return Err(self.error(format!("missing tensor `{name}`")));
        };
        let (dtype, dims) = (info.ggml_dtype, info.shape.dims().to_vec());
        // Sizes and bounds were checked against the file at open.
        let len = info.shape.elem_count() / dtype.block_size() * dtype.type_size();
        let start = self.content.tensor_data_offset + info.offset;
        let path = self.path.clone();
        let io = |e| Error::io(&path, e);
        self.reader.seek(SeekFrom::Start(start)).map_err(io)?;
        let mut bytes = vec![0u8; len];
        self.reader.read_exact(&mut bytes).map_err(io)?;
        Ok((dtype, dims, bytes))
    }

    /// Drops the metadata (the tokenizer's vocabulary and merges are most of
    /// it) once the config and tokenizer are built, so it is not held while
    /// the weights load.
    pub fn forget_metadata(&mut self) {
        self.content.metadata = Default::default();
    }

    pub fn error(&self, reason: String) -> Error {
        Error::Gguf {
            path: self.path.clone(),
            reason,
        }
    }

    fn value(&self, key: &str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| self.error(format!("missing metadata key `{key}`")))
    }

    pub fn has_key(&self, key: &str) -> bool {
        self.content.metadata.contains_key(key)
    }

    pub fn get_string(&self, key: &str) -> Result<String> {
        match self.value(key)? {
            Value::String(s) => Ok(s.clone()),
            v => Err(self.error(format!("metadata `{key}` is {v:?}, expected a string"))),
        }
    }

    /// An unsigned integer of any width.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.value(key)?;
        let n = match v {
            Value::U8(x) => Some(*x as u64),
            Value::U16(x) => Some(*x as u64),
            Value::U32(x) => Some(*x as u64),
            Value::U64(x) => Some(*x),
            Value::I8(x) => u64::try_from(*x).ok(),
            Value::I16(x) => u64::try_from(*x).ok(),
            Value::I32(x) => u64::try_from(*x).ok(),
            Value::I64(x) => u64::try_from(*x).ok(),
            _ => None,
        };
        n.ok_or_else(|| {
            self.error(format!(
                "metadata `{key}` is {v:?}, expected a non-negative integer"
            ))
        })
    }

    pub fn get_usize(&self, key: &str) -> Result<usize> {
        Ok(self.get_u64(key)? as usize)
    }

    pub fn get_f64(&self, key: &str) -> Result<f64> {
        match self.value(key)? {
            Value::F32(x) => Ok(*x as f64),
            Value::F64(x) => Ok(*x),
            v => Err(self.error(format!("metadata `{key}` is {v:?}, expected a float"))),
        }
    }

    pub fn get_bool(&self, key: &str) -> Result<bool> {
        match self.value(key)? {
            Value::Bool(b) => Ok(*b),
            v => Err(self.error(format!("metadata `{key}` is {v:?}, expected a bool"))),
        }
    }

    pub fn get_strings(&self, key: &str) -> Result<Vec<String>> {
        match self.value(key)? {
            Value::Array(items) => {
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| match v {
                        Value::String(s) => Ok(s.clone()),
                        v => Err(self
                            .error(format!("metadata `{key}`[{i}] is {v:?}, expected a string"))),
                    })
                    .collect()
            }
            v => Err(self.error(format!("metadata `{key}` is {v:?}, expected an array"))),
        }
    }

    pub fn get_ints(&self, key: &str) -> Result<Vec<i64>> {
        match self.value(key)? {
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::U8(x) => Ok(*x as i64),
                    Value::I8(x) => Ok(*x as i64),
                    Value::U16(x) => Ok(*x as i64),
                    Value::I16(x) => Ok(*x as i64),
                    Value::U32(x) => Ok(*x as i64),
                    Value::I32(x) => Ok(*x as i64),
                    Value::I64(x) => Ok(*x),
                    Value::U64(x) => Ok(*x as i64),
                    v => Err(self.error(format!(
                        "metadata `{key}`[{i}] is {v:?}, expected an integer"
                    ))),
                })
                .collect(),
            v => Err(self.error(format!("metadata `{key}` is {v:?}, expected an array"))),
        }
    }
}

fn supported_list() -> String {
    SUPPORTED_TYPES
        .iter()
        .map(|t| format!("{t:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file;
    use candle_core::Tensor;

    /// Writes a small valid GGUF with one metadata key and two tensors.
    fn write_gguf(path: &Path, dtype: GgmlDType) {
        let t = Tensor::arange(0f32, 64.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 32))
            .unwrap();
        let q = QTensor::quantize(&t, dtype).unwrap();
        let n = QTensor::quantize(
            &Tensor::ones(32, candle_core::DType::F32, &Device::Cpu).unwrap(),
            GgmlDType::F32,
        )
        .unwrap();
        let mut f = File::create(path).unwrap();
        gguf_file::write(
            &mut f,
            &[("general.architecture", &Value::String("llama".into()))],
            &[("w", &q), ("norm", &n)],
        )
        .unwrap();
    }

    #[test]
    fn reads_a_valid_file_and_its_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ok.gguf");
        write_gguf(&p, GgmlDType::Q8_0);
        let mut g = GgufFile::open(&p).unwrap();
        assert_eq!(g.get_string("general.architecture").unwrap(), "llama");
        assert_eq!(g.tensor_type("w"), Some(GgmlDType::Q8_0));
        let w = g.tensor("w", &Device::Cpu).unwrap();
        let back = w
            .dequantize(&Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        // Q8_0 of 0..63 in blocks of 32: within half a quantization step.
        for (i, row) in back.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                let want = (i * 32 + j) as f32;
                assert!(
                    (v - want).abs() <= 63.0 / 127.0 / 2.0 + 1e-4,
                    "{v} vs {want}"
                );
            }
        }
        let e = g
            .get_string("tokenizer.ggml.model")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ok.gguf") && e.contains("missing metadata key `tokenizer.ggml.model`"),
            "{e}"
        );
        let e = g.tensor("nope", &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("missing tensor `nope`"), "{e}");
    }

    #[test]
    fn wrong_magic_and_truncation_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model.gguf");
        std::fs::write(&p, b"PK\x03\x04 this is a zip, not a model").unwrap();
        let e = GgufFile::open(&p).unwrap_err().to_string();
        assert!(
            e.contains("model.gguf") && e.contains("not a GGUF file: magic number"),
            "{e}"
        );

        std::fs::write(&p, b"GG").unwrap();
        let e = GgufFile::open(&p).unwrap_err().to_string();
        assert!(e.contains("too short"), "{e}");

        write_gguf(&p, GgmlDType::Q4_1);
        let full = std::fs::read(&p).unwrap();
        std::fs::write(&p, &full[..full.len() - 10]).unwrap();
        let e = GgufFile::open(&p).unwrap_err().to_string();
        assert!(
            e.contains("truncated: tensor `") && e.contains("model.gguf"),
            "{e}"
        );

        // Cut inside the metadata: candle's parser fails, the file is named.
        std::fs::write(&p, &full[..40]).unwrap();
        let e = GgufFile::open(&p).unwrap_err().to_string();
        assert!(
            e.contains("model.gguf") && e.contains("corrupt or truncated"),
            "{e}"
        );
    }

    /// Found by fuzzing: dimensions whose product overflows (here 2^40 ×
    /// 2^40) are refused, not wrapped into a small size that passes the
    /// bounds check.
    #[test]
    fn a_shape_whose_size_overflows_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big.gguf");
        write_gguf(&p, GgmlDType::F32);
        let mut bytes = std::fs::read(&p).unwrap();
        // Tensor info of `w`: name length (u64 1), "w", n_dims (u32 2), dims (2 × u64).
        let key = [1u8, 0, 0, 0, 0, 0, 0, 0, b'w', 2, 0, 0, 0];
        let at = bytes
            .windows(key.len())
            .position(|w| w == key)
            .expect("w's tensor info")
            + key.len();
        for d in 0..2 {
            bytes[at + 8 * d..at + 8 * d + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        }
        std::fs::write(&p, &bytes).unwrap();
        let e = GgufFile::open(&p).unwrap_err().to_string();
        assert!(
            e.contains("big.gguf") && e.contains("tensor `w`") && e.contains("more elements"),
            "{e}"
        );
    }

    #[test]
    fn an_unsupported_tensor_type_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("q2.gguf");
        // Q2K needs 256-element blocks.
        let t = Tensor::zeros((1, 256), candle_core::DType::F32, &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::Q2K).unwrap();
        let mut f = File::create(&p).unwrap();
        gguf_file::write(&mut f, &[], &[("blk.0.attn_q.weight", &q)]).unwrap();
        drop(f);
        let e = GgufFile::open(&p).unwrap_err().to_string();
        assert!(
            e.contains("q2.gguf") && e.contains("tensor `blk.0.attn_q.weight` has type Q2K"),
            "{e}"
        );
    }
}
