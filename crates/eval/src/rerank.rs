//! Retrieval re-ranked by a fusion model (`clasp eval retrieval --rerank`):
//! each caption's top K photos and each photo's top K captions by the first
//! stage are re-scored by BLIP-2's ITM head and re-ordered; the rest keep
//! their places below them. The recall of both directions is then read off
//! as without re-ranking.

use candle_core::Tensor;
use clasp_core::model::blip2::{Blip2Retrieval, Rerank, RerankScore};

use crate::data::PairSet;
use crate::metrics::{image_to_text_ranks, text_to_image_ranks, DirectionRanks, RetrievalMetrics};
use crate::progress::Progress;
use crate::{Error, Result};

/// Above every first-stage score (cosines), so re-scored candidates rank
/// first; they take LIFT + (K − their new place), exact in f32.
const LIFT: f32 = 1e4;

/// Writes the candidates' new order into `out` at `at(candidate)`.
fn place(out: &mut [f32], mut keyed: Vec<(usize, f64)>, at: impl Fn(usize) -> usize) {
    keyed.sort_by(|a, b| b.1.total_cmp(&a.1));
    let k = keyed.len();
    for (j, (c, _)) in keyed.into_iter().enumerate() {
        out[at(c)] = LIFT + (k - j) as f32;
    }
}

/// The score matrices (texts × images, row-major) of both directions after
/// re-ranking: rows re-scored for text→image, columns for image→text.
pub struct Reranked {
    pub t2i: Vec<f32>,
    pub i2t: Vec<f32>,
    /// The same candidates ordered by the other score (`itm` for
    /// `itm+sim` and back), from the same ITM passes.
    pub other: RerankScore,
    pub other_t2i: Vec<f32>,
    pub other_i2t: Vec<f32>,
    /// ITM passes made.
    pub pairs_scored: usize,
}

/// The indices of the `k` best of `scores`, best first (ties: lower index).
fn top_k(scores: impl Iterator<Item = f32>, k: usize) -> Vec<(usize, f32)> {
    let mut v: Vec<(usize, f32)> = scores.enumerate().collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    v.truncate(k);
    v
}

/// The vision tower's features of every photo of `set` ([1, P, E] each),
/// one photo at a time.
pub fn photo_features(
    model: &Blip2Retrieval,
    set: &PairSet,
    what: &str,
    progress: &dyn Progress,
) -> Result<Vec<Tensor>> {
    progress.start(what, set.images.len() as u64);
    let side = model.cfg.vision_config.image_size;
    let feats = set
        .images
        .iter()
        .map(|src| {
            let name = std::path::PathBuf::from(src.display_name());
            let img = crate::preprocess::image::decode_image(&src.read()?, &name)?;
            let px = model.processor.process(&img)?;
            let t = Tensor::from_vec(px, (1, 3, side, side), model.device())?;
            let f = model.image_features(&t);
            progress.inc(1);
            f
        })
        .collect::<Result<_>>()?;
    progress.finish();
    Ok(feats)
}

/// BLIP-2's own first stage (ITC): every caption against every photo of
/// `set`, scored by the best of the photo's query embeddings (cosines),
/// texts × images row-major, as [`crate::metrics::retrieval_ranks`] reads.
pub fn itc_scores(
    model: &Blip2Retrieval,
    set: &PairSet,
    batch: usize,
    progress: &dyn Progress,
) -> Result<Vec<f32>> {
    let feats = photo_features(model, set, "ITC: photos", progress)?;
    let _no_grad = clasp_core::model::grad_mode_guard(false);
    let image_embeds = feats
        .iter()
        .map(|f| model.heads.image_embeds(f))
        .collect::<Result<Vec<_>>>()?;
    progress.start("ITC: captions", set.captions.len() as u64);
    let mut texts = Vec::new();
    for chunk in set.captions.chunks(batch.max(1)) {
        texts.push(model.text_embeds(chunk)?);
        progress.inc(chunk.len() as u64);
    }
    progress.finish();
    let texts = Tensor::cat(&texts, 0)?;
    // [I, N, D] x [D, T], max over the queries, in blocks of photos.
    let mut cols = Vec::new();
    for block in image_embeds.chunks(64) {
        let q = Tensor::cat(block, 0)?;
        cols.push(clasp_core::model::qformer::QFormerHeads::itc(&q, &texts)?);
    }
    let i2t = Tensor::cat(&cols, 0)?;
    Ok(i2t.t()?.contiguous()?.flatten_all()?.to_vec1()?)
}

/// Re-ranks `scores` (texts × images of `set`) with `model`.
pub fn rerank(
    model: &Blip2Retrieval,
    set: &PairSet,
    scores: &[f32],
    how: Rerank,
    progress: &dyn Progress,
) -> Result<Reranked> {
    let (n_texts, n_images) = (set.captions.len(), set.images.len());
    if scores.len() != n_texts * n_images {
        return Err(Error::Report(
            "re-ranking: the score matrix does not fit the set".into(),
        ));
    }
    let (k_images, k_texts) = (how.candidates.min(n_images), how.candidates.min(n_texts));
    let feats = photo_features(model, set, "re-ranking: photo features", progress)?;
    let other = match how.score {
        RerankScore::Itm => RerankScore::ItmPlusSim,
        RerankScore::ItmPlusSim => RerankScore::Itm,
    };
    let mut out = Reranked {
        t2i: scores.to_vec(),
        i2t: scores.to_vec(),
        other,
        other_t2i: scores.to_vec(),
        other_i2t: scores.to_vec(),
        pairs_scored: 0,
    };
    let keyed = |top: &[(usize, f32)], logits: &[[f32; 2]], s: RerankScore| -> Vec<(usize, f64)> {
        top.iter()
            .zip(logits)
            .map(|((c, sim), l)| (*c, s.score(*l, *sim as f64).1))
            .collect()
    };
    progress.start("re-ranking: captions", n_texts as u64);
    for t in 0..n_texts {
        let row = &scores[t * n_images..(t + 1) * n_images];
        let top = top_k(row.iter().copied(), k_images);
        let images: Vec<Tensor> = top.iter().map(|(i, _)| feats[*i].clone()).collect();
        let logits = model.itm_logits_features(&Tensor::cat(&images, 0)?, &set.captions[t])?;
        place(&mut out.t2i, keyed(&top, &logits, how.score), |i| {
            t * n_images + i
        });
        place(&mut out.other_t2i, keyed(&top, &logits, other), |i| {
            t * n_images + i
        });
        out.pairs_scored += k_images;
        progress.inc(1);
    }
    progress.finish();
    progress.start("re-ranking: photos", n_images as u64);
    for (i, f) in feats.iter().enumerate() {
        let col = (0..n_texts).map(|t| scores[t * n_images + i]);
        let top = top_k(col, k_texts);
        let texts: Vec<String> = top.iter().map(|(t, _)| set.captions[*t].clone()).collect();
        let logits: Vec<[f32; 2]> = model
            .itm_logits(f, &texts)?
            .to_vec2::<f32>()?
            .into_iter()
            .map(|l| [l[0], l[1]])
            .collect();
        place(&mut out.i2t, keyed(&top, &logits, how.score), |t| {
            t * n_images + i
        });
        place(&mut out.other_i2t, keyed(&top, &logits, other), |t| {
            t * n_images + i
        });
        out.pairs_scored += k_texts;
        progress.inc(1);
    }
    progress.finish();
    Ok(out)
}

/// How re-ranking changed R@1, query by query: (fixed, broken), the queries
/// whose first hit moved to the top and those whose top hit was lost (the
/// two counts McNemar's test compares).
pub fn r1_changes(before: &DirectionRanks, after: &DirectionRanks) -> (usize, usize) {
    let pairs = before.first.iter().zip(&after.first);
    let fixed = pairs.clone().filter(|(b, a)| **b > 1 && **a == 1).count();
    let broken = pairs.filter(|(b, a)| **b == 1 && **a > 1).count();
    (fixed, broken)
}

/// One order of a re-ranking read off: its recall, and R@1's
/// (fixed, broken) per direction (text→image, image→text) against the
/// first stage's ranks `before`.
pub struct Reordered {
    pub metrics: RetrievalMetrics,
    pub r1_changes: [(usize, usize); 2],
}

impl Reordered {
    /// `t2i`/`i2t`: the re-ranked score matrices (texts × images of `set`)
    /// of each direction.
    pub fn read(
        t2i: &[f32],
        i2t: &[f32],
        set: &PairSet,
        before: (&DirectionRanks, &DirectionRanks),
        ks: &[usize],
    ) -> Self {
        let n = t2i.len() / set.captions.len().max(1);
        let t2i = text_to_image_ranks(t2i, n, &set.caption_image);
        let i2t = image_to_text_ranks(i2t, n, &set.caption_image);
        Self {
            metrics: RetrievalMetrics::from_ranks(&t2i, &i2t, ks),
            r1_changes: [r1_changes(before.0, &t2i), r1_changes(before.1, &i2t)],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn r1_changes_count_the_queries_that_moved_across_the_top() {
        let ranks = |first: Vec<usize>| DirectionRanks {
            ap: vec![0.0; first.len()],
            first,
            n_candidates: 10,
        };
        let before = ranks(vec![1, 2, 1, 5, 1, 3]);
        let after = ranks(vec![1, 1, 3, 1, 1, 2]);
        assert_eq!(r1_changes(&before, &after), (2, 1));
    }
}
