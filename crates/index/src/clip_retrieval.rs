//! Bulk embeddings in clip-retrieval's output layout (`clip-retrieval
//! inference`'s `NumpyWriter`), which its `index` step and autofaiss read:
//!
//! - `img_emb/img_emb_{i}.npy` and `text_emb/text_emb_{i}.npy`: unit rows as
//!   float16, one row a sample, in the part's order;
//! - `metadata/metadata_{i}.parquet`: the columns `image_path` and `caption`,
//!   row for row.
//!
//! `{i}` is the part number zero-padded to `⌊log10(parts)⌋ + 1` digits, as
//! clip-retrieval pads it. A part is written files first and its parquet
//! last, each atomically, so a part whose parquet exists is finished and is
//! never redone: an interrupted job resumes, and workers that split the parts
//! by number (`part % N == I`) need no coordination.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parquet::data_type::{ByteArray, ByteArrayType};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;

use crate::{atomic, Error, Result};

/// The parts of `n` samples: in runs of `part_size`, or, when `groups` says
/// which group (a WebDataset's shard) each sample comes from, one part per
/// run of samples of one group, split further at `part_size`.
pub fn plan_parts(n: usize, part_size: usize, groups: Option<&[usize]>) -> Vec<Vec<usize>> {
    let size = part_size.max(1);
    let mut parts: Vec<Vec<usize>> = Vec::new();
    for i in 0..n {
        let new_group = match (groups, parts.last().and_then(|p| p.last())) {
            (Some(g), Some(&prev)) => g[prev] != g[i],
            _ => false,
        };
        match parts.last_mut() {
            Some(p) if p.len() < size && !new_group => p.push(i),
            _ => parts.push(vec![i]),
        }
    }
    parts
}

/// `part` zero-padded as clip-retrieval pads it for `parts` parts.
pub fn part_name(part: usize, parts: usize) -> String {
    let width = (parts.max(1) as f64).log10().floor() as usize + 1;
    format!("{part:0width$}")
}

fn metadata_path(dir: &Path, part: usize, parts: usize) -> PathBuf {
    dir.join("metadata")
        .join(format!("metadata_{}.parquet", part_name(part, parts)))
}

/// Whether part `part` of `parts` is already written in `dir`.
pub fn part_done(dir: &Path, part: usize, parts: usize) -> bool {
    metadata_path(dir, part, parts).is_file()
}

/// One finished part: each sample's image and text embedding (unit rows of
/// one width), its image path and its caption.
pub struct PartRows<'a> {
    pub images: &'a [Vec<f32>],
    pub texts: &'a [Vec<f32>],
    pub image_paths: &'a [String],
    pub captions: &'a [String],
}

/// Writes part `part` of `parts` into `dir` (the layout's three folders).
pub fn write_part(dir: &Path, part: usize, parts: usize, rows: &PartRows) -> Result<()> {
    let n = rows.images.len();
    if rows.texts.len() != n || rows.image_paths.len() != n || rows.captions.len() != n {
        return Err(Error::Report(format!(
            "part {part}: {n} image rows, {} text rows, {} paths and {} captions",
            rows.texts.len(),
            rows.image_paths.len(),
            rows.captions.len()
        )));
    }
    let name = part_name(part, parts);
    for (sub, m) in [("img_emb", rows.images), ("text_emb", rows.texts)] {
        let folder = dir.join(sub);
        std::fs::create_dir_all(&folder).map_err(|e| Error::io(&folder, e))?;
        atomic::write_bytes(&folder.join(format!("{sub}_{name}.npy")), &npy_f16(m)?)?;
    }
    let meta = dir.join("metadata");
    std::fs::create_dir_all(&meta).map_err(|e| Error::io(&meta, e))?;
    let path = metadata_path(dir, part, parts);
    let tmp = atomic::temp_beside(&path);
    write_parquet(&tmp, rows.image_paths, rows.captions)?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))
}

/// The rows as a float16 `.npy` (format 1.0, C order).
fn npy_f16(rows: &[Vec<f32>]) -> Result<Vec<u8>> {
    let d = rows.first().map_or(0, Vec::len);
    if rows.iter().any(|r| r.len() != d) {
        return Err(Error::Report("embedding rows of different widths".into()));
    }
    let mut header = format!(
        "{{'descr': '<f2', 'fortran_order': False, 'shape': ({}, {d}), }}",
        rows.len()
    );
    // Magic, version, length, then the header padded to a multiple of 64.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + rows.len() * d * 2);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for r in rows {
        for &x in r {
            out.extend_from_slice(&half::f16::from_f32(x).to_le_bytes());
        }
    }
    Ok(out)
}

fn write_parquet(path: &Path, image_paths: &[String], captions: &[String]) -> Result<()> {
    let pq = |e: parquet::errors::ParquetError| Error::Report(format!("{}: {e}", path.display()));
    let schema = parse_message_type(
        "message schema { REQUIRED BYTE_ARRAY image_path (UTF8); REQUIRED BYTE_ARRAY caption (UTF8); }",
    )
    .map_err(pq)?;
    let file = File::create(path).map_err(|e| Error::io(path, e))?;
    let props = Arc::new(WriterProperties::builder().build());
    let mut w = SerializedFileWriter::new(file, Arc::new(schema), props).map_err(pq)?;
    let mut group = w.next_row_group().map_err(pq)?;
    for values in [image_paths, captions] {
        let col: Vec<ByteArray> = values.iter().map(|s| ByteArray::from(s.as_str())).collect();
        let mut c = group
            .next_column()
            .map_err(pq)?
            .ok_or_else(|| Error::Report("the parquet schema has fewer columns".into()))?;
        c.typed::<ByteArrayType>()
            .write_batch(&col, None, None)
            .map_err(pq)?;
        c.close().map_err(pq)?;
    }
    group.close().map_err(pq)?;
    w.close().map_err(pq)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_follow_groups_and_sizes_and_names_are_padded() {
        assert_eq!(
            plan_parts(5, 2, None),
            vec![vec![0, 1], vec![2, 3], vec![4]]
        );
        let g = [0, 0, 0, 1, 1];
        assert_eq!(
            plan_parts(5, 2, Some(&g)),
            vec![vec![0, 1], vec![2], vec![3, 4]]
        );
        assert_eq!(part_name(3, 9), "3");
        assert_eq!(part_name(3, 10), "03");
        assert_eq!(part_name(42, 999), "042");
        assert_eq!(part_name(42, 1000), "0042");
    }

    #[test]
    fn npy_header_is_numpys() {
        let b = npy_f16(&[vec![1.0, -2.0], vec![0.5, 0.0]]).unwrap();
        let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0);
        let h = std::str::from_utf8(&b[10..10 + hlen]).unwrap();
        assert!(h.starts_with("{'descr': '<f2', 'fortran_order': False, 'shape': (2, 2), }"));
        assert_eq!(
            &b[10 + hlen..10 + hlen + 2],
            &half::f16::from_f32(1.0).to_le_bytes()
        );
        assert_eq!(b.len(), 10 + hlen + 8);
    }
}
