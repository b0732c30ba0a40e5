//! Search over a store: vector search through [`VectorSearch`], optional
//! BM25 text search over captions, fused by Reciprocal Rank Fusion, and
//! zero-shot classification of stored images.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use super::catalog::{under, FileRow, Hash};
use super::engine::VectorSearch;
use super::store::Store;
use crate::{Encoder, Result};

/// The RRF constant of Cormack et al. (2009), as the seeds specify.
pub const RRF_K: f64 = 60.0;

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Hit {
    pub path: String,
    pub score: f64,
}

/// Embeddable files under `dirs` (all when empty), grouped by content hash.
pub fn files_by_hash(
    catalog: &mut dyn Store,
    dirs: &[String],
) -> Result<HashMap<Hash, Vec<FileRow>>> {
    let mut m: HashMap<Hash, Vec<FileRow>> = HashMap::new();
    for f in catalog.files_under(dirs)? {
        if let (None, Some(h)) = (&f.error, f.hash) {
            m.entry(h).or_default().push(f);
        }
    }
    Ok(m)
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
    let by_hash = files_by_hash(catalog, dirs)?;
    let allow: Option<HashSet<Hash>> =
        (!dirs.is_empty()).then(|| by_hash.keys().copied().collect());
    let hits = engine.search(query, k, allow.as_ref())?;
    let mut out = Vec::new();
    for (h, s) in hits {
        if let Some(files) = by_hash.get(&h) {
            for f in files {
                out.push(Hit {
                    path: f.path.clone(),
                    score: s as f64,
                });
            }
        }
        if out.len() >= k {
            break;
        }
    }
    out.truncate(k);
    Ok(out)
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
    let mut hits: Vec<Hit> = score
        .into_iter()
        .map(|(p, s)| Hit {
            path: p.to_string(),
            score: s,
        })
        .collect();
    hits.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(first_seen[a.path.as_str()].cmp(&first_seen[b.path.as_str()]))
    });
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
        .map(|h| h.path)
        .collect();
    let text_hits: Vec<String> = catalog
        .text_search(text, depth * 4)?
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| dirs.is_empty() || dirs.iter().any(|d| under(p, d)))
        .take(depth)
        .collect();
    Ok(rrf(&[vec_hits, text_hits], k))
}

#[derive(Clone, Debug, Serialize)]
pub struct Label {
    pub path: String,
    pub label: String,
    /// Softmax probability over the labels at CLIP's scale of 100.
    pub probability: f64,
}

/// Zero-shot labels for every image under `dirs` that has a vector for
/// `model`.
pub fn classify(
    encoder: &Encoder,
    catalog: &mut dyn Store,
    model: i64,
    labels: &[String],
    templates: &[String],
    dirs: &[String],
) -> Result<Vec<Label>> {
    let classes = encoder.prompt_ensemble(labels, templates, 64)?;
    let by_hash = files_by_hash(catalog, dirs)?;
    let mut out = Vec::new();
    catalog.for_each_vector(model, &mut |h, v| {
        let Some(files) = by_hash.get(&h) else {
            return;
        };
        let (best, p) = crate::preprocess::prompts::class_probabilities(v, &classes);
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
}
