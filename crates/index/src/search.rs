//! Search over a store: vector search through [`VectorSearch`], optional
//! BM25 text search over captions, fused by Reciprocal Rank Fusion, and
//! zero-shot classification of stored images.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use super::catalog::{under_any, FileRow, Hash};
use super::engine::VectorSearch;
use super::store::Store;
use crate::{Embedder, Result};

/// The RRF constant of Cormack et al. (2009), as the seeds specify.
pub const RRF_K: f64 = 60.0;

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Hit {
    /// The file: a photo, or the video a segment is of.
    pub path: String,
    pub score: f64,
    /// The fusion model's match probability, when re-ranked (`rerank`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub itm: Option<f64>,
    /// A video segment's time range (`start` and `end` in the JSON).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub span: Option<Span>,
}

/// A video segment's start and end, in seconds.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct Span {
    pub start: f64,
    pub end: f64,
}

impl Hit {
    /// The hit of a stored path (a segment's is split into its video's
    /// path and time range).
    pub fn new(stored: &str, score: f64) -> Self {
        let (path, span) = match super::video_segments::parse_segment(stored) {
            Some((v, start, end)) => (v, Some(Span { start, end })),
            None => (stored, None),
        };
        Self {
            path: path.to_string(),
            score,
            itm: None,
            span,
        }
    }

    /// The path as stored (a segment's with its `#t=` range), by which the
    /// store knows the hit.
    pub fn stored_path(&self) -> String {
        match self.span {
            Some(s) => super::video_segments::segment_path(&self.path, s.start, s.end),
            None => self.path.clone(),
        }
    }

    /// The hit's picture: the photo, or a segment's middle frame.
    pub fn image(&self) -> Result<image::RgbImage> {
        let path = std::path::Path::new(&self.path);
        match self.span {
            Some(s) => {
                let info = clasp_core::video::probe(path)?;
                Ok(clasp_core::video::frame_at(&info, (s.start + s.end) / 2.0)?.image)
            }
            None => crate::preprocess::image::load_image(path),
        }
    }

    /// The hit for people: a segment as `clip.mp4 @ 00:12–00:16`.
    pub fn display(&self) -> String {
        match self.span {
            Some(s) => format!(
                "{} @ {}–{}",
                self.path,
                super::video_segments::clock(s.start),
                super::video_segments::clock(s.end)
            ),
            None => self.path.clone(),
        }
    }
}

/// Embeddable files under `dirs` (all when empty), grouped by content hash.
pub fn files_by_hash(
    catalog: &mut dyn Store,
    dirs: &[String],
) -> Result<HashMap<Hash, Vec<FileRow>>> {
    Ok(group_by_hash(catalog.files_under(dirs)?, dirs))
}

/// The embeddable rows among `rows` that lie under `dirs` (all when
/// empty), grouped by content hash, keeping their order.
fn group_by_hash(
    rows: impl IntoIterator<Item = FileRow>,
    dirs: &[String],
) -> HashMap<Hash, Vec<FileRow>> {
    let mut m: HashMap<Hash, Vec<FileRow>> = HashMap::new();
    for f in rows {
        if let (None, Some(h)) = (&f.error, f.hash) {
            if under_any(&f.path, dirs) {
                m.entry(h).or_default().push(f);
            }
        }
    }
    m
}

/// The best `k` files for a query vector, restricted to `dirs`. Files with
/// identical content share a score; each is listed.
pub fn vector_search(
    engine: &dyn VectorSearch,
    catalog: &mut dyn Store,
    query: &[f32],
    k: usize,
    dirs: &[String],
) -> Result<Vec<Hit>> {
    // An empty store (nothing indexed for this model yet) has no answers,
    // whatever the query's width.
    if engine.is_empty() {
        return Ok(Vec::new());
    }
    // The usual case first: the folder holds most of the store, so the best
    // matches overall, filtered to the folder afterwards, already give k
    // files. Only their files are read, not the whole catalog (at 100k
    // files, reading it all was a fifth of a cold search). The folder's
    // top k are the first k folder files in the overall order, so when
    // `wide` overall matches hold k of them (or are all there is), the
    // answer is the one the filtered search gives.
    let wide = (k * 4).max(64);
    if wide < engine.len() {
        let hits = engine.search(query, wide, None)?;
        let complete = hits.len() < wide;
        let hashes: Vec<Hash> = hits.iter().map(|h| h.0).collect();
        let by_hash = group_by_hash(catalog.files_with_hashes(&hashes)?, dirs);
        let out = files_of_hits(hits, &by_hash, k);
        if out.len() >= k || complete {
            return Ok(out);
        }
    }
    let by_hash = files_by_hash(catalog, dirs)?;
    let allow: Option<HashSet<Hash>> =
        (!dirs.is_empty()).then(|| by_hash.keys().copied().collect());
    let hits = engine.search(query, k, allow.as_ref())?;
    Ok(files_of_hits(hits, &by_hash, k))
}

/// The first `k` files of scored hashes, each hash's files in path order.
fn files_of_hits(
    hits: Vec<(Hash, f32)>,
    by_hash: &HashMap<Hash, Vec<FileRow>>,
    k: usize,
) -> Vec<Hit> {
    let mut out = Vec::new();
    for (h, s) in hits {
        if let Some(files) = by_hash.get(&h) {
            for f in files {
                out.push(Hit::new(&f.path, s as f64));
            }
        }
        if out.len() >= k {
            break;
        }
    }
    out.truncate(k);
    out
}

/// Reciprocal Rank Fusion: score(d) = Σ over lists of 1 / (RRF_K + rank),
/// ranks starting at 1.
pub fn rrf(lists: &[Vec<String>], k: usize) -> Vec<Hit> {
    let mut score: HashMap<&str, f64> = HashMap::new();
    let mut first_seen: HashMap<&str, usize> = HashMap::new();
    let mut order = 0;
    for list in lists {
        for (rank, p) in list.iter().enumerate() {
            *score.entry(p).or_default() += 1.0 / (RRF_K + rank as f64 + 1.0);
            first_seen.entry(p).or_insert_with(|| {
                order += 1;
                order
            });
        }
    }
    let mut hits: Vec<(usize, Hit)> = score
        .into_iter()
        .map(|(p, s)| (first_seen[p], Hit::new(p, s)))
        .collect();
    hits.sort_by(|a, b| b.1.score.total_cmp(&a.1.score).then(a.0.cmp(&b.0)));
    let mut hits: Vec<Hit> = hits.into_iter().map(|(_, h)| h).collect();
    hits.truncate(k);
    hits
}

/// Hybrid search: vector hits fused with BM25 hits over captions (sidecar
/// files, EXIF descriptions, file names) by RRF.
pub fn hybrid_search(
    engine: &dyn VectorSearch,
    catalog: &mut dyn Store,
    query: &[f32],
    text: &str,
    k: usize,
    dirs: &[String],
) -> Result<Vec<Hit>> {
    let depth = (k * 4).max(50);
    let vec_hits: Vec<String> = vector_search(engine, catalog, query, depth, dirs)?
        .into_iter()
        .map(|h| h.stored_path())
        .collect();
    let text_hits: Vec<String> = catalog
        .text_search(text, depth * 4)?
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| under_any(p, dirs))
        .take(depth)
        .collect();
    Ok(rrf(&[vec_hits, text_hits], k))
}

#[derive(Clone, Debug, Serialize)]
pub struct Label {
    pub path: String,
    pub label: String,
    /// The label's probability: the softmax over the labels at CLIP's scale
    /// of 100, or SigLIP's own sigmoid (see `ZeroShotScoring`).
    pub probability: f64,
}

/// Zero-shot labels for every image under `dirs` that has a vector for
/// `model`.
pub fn classify(
    encoder: &dyn Embedder,
    catalog: &mut dyn Store,
    model: i64,
    labels: &[String],
    templates: &[String],
    dirs: &[String],
) -> Result<Vec<Label>> {
    let encoder = encoder.dual("zero-shot classification")?;
    let classes = encoder.prompt_ensemble(labels, templates, 64)?;
    let scoring = encoder.zero_shot_scoring()?;
    let by_hash = files_by_hash(catalog, dirs)?;
    let mut out = Vec::new();
    catalog.for_each_vector(model, &mut |h, v| {
        let Some(files) = by_hash.get(&h) else {
            return;
        };
        let (best, p) = clasp_core::zeroshot::class_probabilities(v, &classes, scoring);
        for f in files {
            out.push(Label {
                path: f.path.clone(),
                label: labels[best].clone(),
                probability: p[best],
            });
        }
    })?;
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rrf_by_hand() {
        let a = vec!["x".to_string(), "y".to_string()];
        let b = vec!["y".to_string(), "z".to_string()];
        let h = rrf(&[a, b], 3);
        assert_eq!(h[0].path, "y");
        assert!((h[0].score - (1.0 / 62.0 + 1.0 / 61.0)).abs() < 1e-15);
        assert_eq!(h[1].path, "x");
        assert!((h[1].score - 1.0 / 61.0).abs() < 1e-15);
        assert_eq!(h[2].path, "z");
    }

    /// `vector_search` restricted to a folder equals brute force over that
    /// folder's files, both when the folder holds most of the store (the
    /// best matches overall give k files) and when it holds a few (the
    /// filtered search over the whole catalog), and with no folder at all;
    /// files that share a content are listed together in path order, and
    /// failed files are left out.
    #[test]
    fn folder_search_equals_brute_force_for_big_and_small_folders() {
        use crate::store::Store;
        let d = tempfile::tempdir().unwrap();
        let mut cat = crate::Catalog::open(&d.path().join("s.sqlite")).unwrap();
        let store: &mut dyn Store = &mut cat;
        let dim = 8;
        let id = store.model_id(&[1u8; 32], "test", dim).unwrap();
        let mut rng = 12345u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng >> 11) as f32 / (1u64 << 53) as f32 - 0.5
        };
        // 400 contents: 0..380 in /big, 380..400 in /small; content 7 also
        // as a second file in /big, content 9's file failed.
        let mut files: Vec<(String, Hash, Vec<f32>, bool)> = Vec::new();
        for i in 0..400u32 {
            let mut h = [0u8; 32];
            h[..4].copy_from_slice(&i.to_le_bytes());
            let mut v: Vec<f32> = (0..dim).map(|_| next()).collect();
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.iter_mut().for_each(|x| *x /= n);
            let dir = if i < 380 { "/big" } else { "/small" };
            files.push((format!("{dir}/{i:04}.jpg"), h, v.clone(), i == 9));
            if i == 7 {
                files.push(("/big/copy-of-7.jpg".into(), h, v, false));
            }
        }
        store
            .write(|w| {
                for (path, h, v, failed) in &files {
                    w.upsert_file(&FileRow {
                        path: path.clone(),
                        size: 1,
                        mtime_ns: 0,
                        hash: if *failed { None } else { Some(*h) },
                        error: failed.then(|| "bad".to_string()),
                        caption: String::new(),
                    })?;
                    if !failed {
                        w.put_vector(id, h, v)?;
                    }
                }
                Ok(())
            })
            .unwrap();
        let engine = store.engine(id, usize::MAX).unwrap();
        for q in 0..5 {
            let query: Vec<f32> = files[q * 50].2.iter().map(|x| x + 0.1 * next()).collect();
            for (dir, k) in [
                ("/big", 10),
                ("/small", 10),
                ("/small", 30),
                ("/big", 3),
                ("", 10), // no folder: the whole store
            ] {
                let dot = |v: &[f32]| v.iter().zip(&query).map(|(a, b)| a * b).sum::<f32>();
                let mut want: Vec<(&str, f32)> = files
                    .iter()
                    .filter(|f| f.0.starts_with(dir) && !f.3)
                    .map(|f| (f.0.as_str(), dot(&f.2)))
                    .collect();
                want.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
                want.truncate(k);
                let dirs: Vec<String> = (!dir.is_empty())
                    .then(|| dir.to_string())
                    .into_iter()
                    .collect();
                let got = vector_search(engine.as_ref(), store, &query, k, &dirs).unwrap();
                let got: Vec<(&str, f32)> = got
                    .iter()
                    .map(|h| (h.path.as_str(), h.score as f32))
                    .collect();
                assert_eq!(got.len(), want.len(), "{dir} k {k}");
                for (g, w) in got.iter().zip(&want) {
                    assert_eq!(g.0, w.0, "{dir} k {k}: {got:?} vs {want:?}");
                    assert!((g.1 - w.1).abs() < 1e-5);
                }
            }
        }
    }
}
