//! Re-ranking a retrieval's top hits with a fusion model: BLIP-2's ITM head
//! (`Blip2ForImageTextRetrieval`) looks at the query text and each hit's
//! image together, which the first stage's cosine cannot.
//!
//! - `itm`: order by the ITM head's match probability (softmax over its two
//!   logits, as transformers' examples report it).
//! - `itm+sim`: order by the ITM match logit plus the first stage's
//!   similarity, as ALBEF, BLIP and LAVIS's BLIP-2 retrieval score the
//!   re-ranked candidates.
//!
//! A hit whose image cannot be read keeps its place after the re-scored
//! hits, with a warning that names the file; the others go on.

use std::path::Path;

use clasp_core::model::blip2::Blip2Retrieval;

use crate::search::Hit;
use crate::{Error, Result};

/// How the re-ranked hits are ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RerankScore {
    Itm,
    ItmPlusSim,
}

/// `--rerank itm[:K]` or `itm+sim[:K]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rerank {
    pub score: RerankScore,
    /// How many first-stage hits are re-scored (at least the results asked for).
    pub candidates: usize,
}

/// The candidates re-scored when `:K` is not given.
pub const DEFAULT_CANDIDATES: usize = 32;

impl std::str::FromStr for Rerank {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (name, k) = match s.split_once(':') {
            Some((n, k)) => (n, Some(k)),
            None => (s, None),
        };
        let score = match name {
            "itm" => RerankScore::Itm,
            "itm+sim" => RerankScore::ItmPlusSim,
            _ => {
                return Err(format!(
                    "unknown re-ranker `{name}`: itm[:K] or itm+sim[:K]"
                ))
            }
        };
        let candidates = match k {
            Some(k) => k
                .parse::<usize>()
                .ok()
                .filter(|&k| k > 0)
                .ok_or_else(|| format!("`{k}` is not a number of candidates (itm:32)"))?,
            None => DEFAULT_CANDIDATES,
        };
        Ok(Self { score, candidates })
    }
}

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
            match model.processor.process_path(Path::new(&h.path)) {
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
            let (no, yes) = (l[0] as f64, l[1] as f64);
            let prob = 1.0 / (1.0 + (no - yes).exp());
            h.itm = Some(prob);
            let key = match how {
                RerankScore::Itm => prob,
                RerankScore::ItmPlusSim => yes + h.score,
            };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_rerank_option() {
        let r: Rerank = "itm".parse().unwrap();
        assert_eq!(
            (r.score, r.candidates),
            (RerankScore::Itm, DEFAULT_CANDIDATES)
        );
        let r: Rerank = "itm+sim:128".parse().unwrap();
        assert_eq!((r.score, r.candidates), (RerankScore::ItmPlusSim, 128));
        assert!("itm:0".parse::<Rerank>().unwrap_err().contains("`0`"));
        assert!("cosine".parse::<Rerank>().unwrap_err().contains("`cosine`"));
    }
}
