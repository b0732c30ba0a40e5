//! Re-ranking a retrieval's top hits with a fusion model: BLIP-2's ITM head
//! (`Blip2ForImageTextRetrieval`) looks at the query text and each hit's
//! image together, which the first stage's cosine cannot. The orderings
//! (`itm`, `itm+sim`) are [`RerankScore`]'s.
//!
//! A hit whose image cannot be read keeps its place after the re-scored
//! hits, with a warning that names the file; the others go on.

use clasp_core::model::blip2::Blip2Retrieval;

use crate::search::Hit;
use crate::{Error, Result};

pub use clasp_core::model::blip2::{Rerank, RerankScore, DEFAULT_CANDIDATES};

/// Images whose features are computed together.
const BATCH: usize = 8;

/// Re-scores `hits` (the first stage's, best first) against `query` and
/// returns them in the new order, each with its ITM match probability.
pub fn rerank(
    model: &Blip2Retrieval,
    query: &str,
    hits: Vec<Hit>,
    how: RerankScore,
) -> Result<Vec<Hit>> {
    let mut scored: Vec<(f64, Hit)> = Vec::with_capacity(hits.len());
    let mut unread: Vec<Hit> = Vec::new();
    for chunk in hits.chunks(BATCH) {
        let mut pixels = Vec::with_capacity(chunk.len());
        let mut kept = Vec::with_capacity(chunk.len());
        for h in chunk {
            match h
                .image()
                .and_then(|im| model.processor.process_pixels(&im))
                .map(|p| p.data)
            {
                Ok(px) => {
                    pixels.push(px);
                    kept.push(h.clone());
                }
                Err(e) => {
                    tracing::warn!(path = %h.path, error = %e, "re-ranking: cannot read the image; it keeps its place after the re-scored hits");
                    unread.push(h.clone());
                }
            }
        }
        if kept.is_empty() {
            continue;
        }
        let logits = model.itm_logits_pixels(&pixels, query)?;
        for (mut h, l) in kept.into_iter().zip(logits) {
            let (prob, key) = how.score(l, h.score);
            h.itm = Some(prob);
            scored.push((key, h));
        }
    }
    // Stable: ties keep the first stage's order.
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut out: Vec<Hit> = scored.into_iter().map(|(_, h)| h).collect();
    out.extend(unread);
    Ok(out)
}

/// Refuses a query a fusion model cannot score: it reads one text.
pub fn check_query(texts: &[String], images: usize) -> Result<String> {
    if images > 0 || texts.is_empty() {
        return Err(Error::Report(
            "--rerank scores an image with a text: the query must be text only".into(),
        ));
    }
    Ok(texts.join(" "))
}
