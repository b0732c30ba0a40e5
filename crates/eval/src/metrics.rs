//! Retrieval and classification metrics, defined as CLIP_benchmark defines
//! them (`clip_benchmark/metrics/zeroshot_retrieval.py` and
//! `zeroshot_classification.py`), computed exactly in f64.
//!
//! Ties. CLIP_benchmark ranks with `torch.topk`, whose choice among equal
//! scores at the top-k boundary is an implementation detail of torch (it
//! differs between sizes). clasp fixes one rule, the one a stable descending
//! sort gives: among equal scores the lower index ranks first. The fixture
//! generator (`scripts/gen_eval_fixtures.py`) runs CLIP_benchmark's functions
//! with that rule, and records where torch's own topk disagrees.
//!
//! Recall values are fractions of hits over queries, kept in f64:
//! CLIP_benchmark's `evaluate` takes the mean in float32, which differs from
//! the exact fraction by up to 3e-8.

use serde::Serialize;

/// The K values reported by default, as in CLIP papers.
pub const RECALL_KS: [usize; 3] = [1, 5, 10];

fn key(x: f32) -> f32 {
    if x.is_nan() {
        f32::NEG_INFINITY
    } else {
        x
    }
}

/// 1-based rank of candidate `p` in `row` under the stable rule.
fn stable_rank(row: impl Iterator<Item = f32>, p: usize, sp: f32) -> usize {
    let sp = key(sp);
    let mut rank = 1;
    for (j, s) in row.enumerate() {
        let s = key(s);
        if s > sp || (s == sp && j < p) {
            rank += 1;
        }
    }
    rank
}

/// Median as numpy computes it (the mean of the two middle values for an even
/// count).
pub fn median(values: &[usize]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_unstable();
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2] as f64
    } else {
        (v[n / 2 - 1] as f64 + v[n / 2] as f64) / 2.0
    }
}

/// Per-query ranks of one retrieval direction.
#[derive(Clone, Debug, Default)]
pub struct DirectionRanks {
    /// For each query, the 1-based rank of its best-ranked positive.
    pub first: Vec<usize>,
    /// For each query, its average precision over all its positives.
    pub ap: Vec<f64>,
    /// Candidates per query (the ceiling for K).
    pub n_candidates: usize,
}

impl DirectionRanks {
    /// Fraction of queries with a positive in the top `k` (`k` is clamped to
    /// the number of candidates, where torch.topk would refuse).
    pub fn recall_at(&self, k: usize) -> f64 {
        let k = k.min(self.n_candidates);
        let hits = self.first.iter().filter(|&&r| r <= k).count();
        hits as f64 / self.first.len() as f64
    }
    pub fn median_rank(&self) -> f64 {
        median(&self.first)
    }
    pub fn mean_ap(&self) -> f64 {
        self.ap.iter().sum::<f64>() / self.ap.len() as f64
    }
}

/// Ranks both directions of a text×image score matrix (`scores[t * n_images + i]`,
/// CLIP_benchmark's `texts_emb @ images_emb.T`) where caption `t` belongs to
/// image `caption_image[t]`.
pub fn retrieval_ranks(
    scores: &[f32],
    n_images: usize,
    caption_image: &[usize],
) -> (DirectionRanks, DirectionRanks) {
    (
        text_to_image_ranks(scores, n_images, caption_image),
        image_to_text_ranks(scores, n_images, caption_image),
    )
}

/// Text → image ("image retrieval") of [`retrieval_ranks`]: one positive
/// per text.
pub fn text_to_image_ranks(
    scores: &[f32],
    n_images: usize,
    caption_image: &[usize],
) -> DirectionRanks {
    use rayon::prelude::*;
    let n_texts = caption_image.len();
    assert_eq!(scores.len(), n_texts * n_images, "score matrix shape");
    let t2i: Vec<usize> = (0..n_texts)
        .into_par_iter()
        .map(|t| {
            let row = &scores[t * n_images..(t + 1) * n_images];
            let p = caption_image[t];
            stable_rank(row.iter().copied(), p, row[p])
        })
        .collect();
    DirectionRanks {
        ap: t2i.iter().map(|&r| 1.0 / r as f64).collect(),
        first: t2i,
        n_candidates: n_images,
    }
}

/// Image → text ("text retrieval") of [`retrieval_ranks`]: all captions of
/// the image are positives.
pub fn image_to_text_ranks(
    scores: &[f32],
    n_images: usize,
    caption_image: &[usize],
) -> DirectionRanks {
    use rayon::prelude::*;
    let n_texts = caption_image.len();
    assert_eq!(scores.len(), n_texts * n_images, "score matrix shape");
    let mut positives: Vec<Vec<usize>> = vec![Vec::new(); n_images];
    for (t, &i) in caption_image.iter().enumerate() {
        positives[i].push(t);
    }
    let per_image: Vec<(usize, f64)> = (0..n_images)
        .into_par_iter()
        .map(|i| {
            let col = || (0..n_texts).map(|t| scores[t * n_images + i]);
            let mut ranks: Vec<usize> = positives[i]
                .iter()
                .map(|&p| stable_rank(col(), p, scores[p * n_images + i]))
                .collect();
            ranks.sort_unstable();
            let ap = ranks
                .iter()
                .enumerate()
                .map(|(m, &r)| (m + 1) as f64 / r as f64)
                .sum::<f64>()
                / ranks.len().max(1) as f64;
            (ranks.first().copied().unwrap_or(usize::MAX), ap)
        })
        .collect();
    DirectionRanks {
        first: per_image.iter().map(|x| x.0).collect(),
        ap: per_image.iter().map(|x| x.1).collect(),
        n_candidates: n_texts,
    }
}

/// The retrieval report, with CLIP_benchmark's key names.
#[derive(Clone, Debug, Serialize)]
pub struct RetrievalMetrics {
    /// text→image Recall@K, as `image_retrieval_recall@K`.
    pub image_retrieval_recall: Vec<(usize, f64)>,
    /// image→text Recall@K, as `text_retrieval_recall@K`.
    pub text_retrieval_recall: Vec<(usize, f64)>,
    pub mean_recall: f64,
    pub image_retrieval_median_rank: f64,
    pub text_retrieval_median_rank: f64,
    pub image_retrieval_map: f64,
    pub text_retrieval_map: f64,
}

impl RetrievalMetrics {
    pub fn from_ranks(t2i: &DirectionRanks, i2t: &DirectionRanks, ks: &[usize]) -> Self {
        let ir: Vec<_> = ks.iter().map(|&k| (k, t2i.recall_at(k))).collect();
        let tr: Vec<_> = ks.iter().map(|&k| (k, i2t.recall_at(k))).collect();
        let all: Vec<f64> = ir.iter().chain(&tr).map(|x| x.1).collect();
        Self {
            mean_recall: all.iter().sum::<f64>() / all.len() as f64,
            image_retrieval_recall: ir,
            text_retrieval_recall: tr,
            image_retrieval_median_rank: t2i.median_rank(),
            text_retrieval_median_rank: i2t.median_rank(),
            image_retrieval_map: t2i.mean_ap(),
            text_retrieval_map: i2t.mean_ap(),
        }
    }

    /// Flat `key → value` pairs with CLIP_benchmark's names.
    pub fn to_pairs(&self) -> Vec<(String, f64)> {
        let mut out = Vec::new();
        for (k, v) in &self.image_retrieval_recall {
            out.push((format!("image_retrieval_recall@{k}"), *v));
        }
        for (k, v) in &self.text_retrieval_recall {
            out.push((format!("text_retrieval_recall@{k}"), *v));
        }
        out.push(("mean_recall".into(), self.mean_recall));
        out.push((
            "image_retrieval_median_rank".into(),
            self.image_retrieval_median_rank,
        ));
        out.push((
            "text_retrieval_median_rank".into(),
            self.text_retrieval_median_rank,
        ));
        out.push(("image_retrieval_map".into(), self.image_retrieval_map));
        out.push(("text_retrieval_map".into(), self.text_retrieval_map));
        out
    }
}

/// Zero-shot classification results.
#[derive(Clone, Debug, Serialize)]
pub struct ClassificationMetrics {
    pub acc1: f64,
    /// `None` with fewer than 5 classes (CLIP_benchmark reports NaN).
    pub acc5: Option<f64>,
    /// sklearn's balanced accuracy of the argmax predictions.
    pub mean_per_class_recall: f64,
    /// Recall of each class (`None` for classes with no samples).
    pub per_class_recall: Vec<Option<f64>>,
    /// confusion[true][pred] counts of the argmax predictions.
    pub confusion: Vec<Vec<usize>>,
}

/// Computes classification metrics from logits `[n, n_classes]` row-major.
pub fn classification_metrics(
    logits: &[f32],
    n_classes: usize,
    targets: &[usize],
) -> ClassificationMetrics {
    let n = targets.len();
    assert_eq!(logits.len(), n * n_classes, "logit matrix shape");
    let mut confusion = vec![vec![0usize; n_classes]; n_classes];
    let (mut c1, mut c5) = (0usize, 0usize);
    for (i, &t) in targets.iter().enumerate() {
        let row = &logits[i * n_classes..(i + 1) * n_classes];
        let r = stable_rank(row.iter().copied(), t, row[t]);
        c1 += (r <= 1) as usize;
        c5 += (r <= 5) as usize;
        // argmax: the first maximum, as torch.argmax returns it.
        let mut best = 0;
        for (j, &s) in row.iter().enumerate() {
            if key(s) > key(row[best]) {
                best = j;
            }
        }
        confusion[t][best] += 1;
    }
    let per_class_recall: Vec<Option<f64>> = confusion
        .iter()
        .enumerate()
        .map(|(c, row)| {
            let total: usize = row.iter().sum();
            (total > 0).then(|| row[c] as f64 / total as f64)
        })
        .collect();
    let present: Vec<f64> = per_class_recall.iter().flatten().copied().collect();
    ClassificationMetrics {
        acc1: c1 as f64 / n as f64,
        acc5: (n_classes >= 5).then(|| c5 as f64 / n as f64),
        mean_per_class_recall: present.iter().sum::<f64>() / present.len() as f64,
        per_class_recall,
        confusion,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_by_hand() {
        // 3 texts x 2 images; texts 0,1 -> image 0, text 2 -> image 1.
        #[rustfmt::skip]
        let s = [
            0.9, 0.1,   // t0: image 0 first
            0.2, 0.2,   // t1: tie, lower index first -> image 0 rank 1
            0.8, 0.3,   // t2: image 1 second
        ];
        let (t2i, i2t) = retrieval_ranks(&s, 2, &[0, 0, 1]);
        assert_eq!(t2i.first, vec![1, 1, 2]);
        assert!((t2i.recall_at(1) - 2.0 / 3.0).abs() < 1e-15);
        assert_eq!(t2i.recall_at(10), 1.0);
        // image 0 column: [0.9, 0.2, 0.8] -> positives t0 (rank 1), t1 (rank 3).
        // image 1 column: [0.1, 0.2, 0.3] -> positive t2 (rank 1).
        assert_eq!(i2t.first, vec![1, 1]);
        assert!((i2t.ap[0] - (1.0 + 2.0 / 3.0) / 2.0).abs() < 1e-15);
        assert_eq!(i2t.ap[1], 1.0);
        assert_eq!(median(&[1, 2, 3, 10]), 2.5);
    }

    #[test]
    fn classification_by_hand() {
        let logits = [0.9, 0.1, 0.5, 0.5, 0.2, 0.7, 0.3, 0.3];
        let m = classification_metrics(&logits, 2, &[0, 1, 1, 0]);
        // rows: pred 0 (ok), tie->0 (wrong), pred 1 (ok), tie->0 (ok)
        assert_eq!(m.acc1, 0.75);
        assert_eq!(m.acc5, None);
        assert_eq!(m.confusion, vec![vec![2, 0], vec![1, 1]]);
        assert_eq!(m.mean_per_class_recall, 0.75);
    }
}
