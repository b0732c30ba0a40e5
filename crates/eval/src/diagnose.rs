//! Alignment diagnostics: the modality gap, per-modality spread ("semantic
//! collapse"), positive vs negative similarity, and a near-synonym probe.

use serde::Serialize;

use super::embed::EmbedContext;
use super::retrieval::{score_matrix, EmbeddedPairs};
use crate::data::Lang;
use crate::vecmath::dot;
use crate::Result;

/// Built-in pairs of phrases that mean the same thing.
pub const SYNONYMS_EN: [(&str, &str); 6] = [
    ("a red apple", "a red-colored apple"),
    ("a dog running on the grass", "a dog runs across the lawn"),
    ("a man riding a bicycle", "a man on a bike"),
    ("two children playing", "two kids play"),
    ("a small boat on the water", "a little boat on the water"),
    ("a black and white dog", "a dog with black and white fur"),
];
pub const SYNONYMS_ZH: [(&str, &str); 6] = [
    ("红色苹果", "红苹果"),
    ("一只狗在草地上奔跑", "一条狗在草坪上跑"),
    ("一个男人骑自行车", "一个男人骑单车"),
    ("两个孩子在玩耍", "两个小孩在玩"),
    ("水面上的一艘小船", "水上的一条小船"),
    ("一只黑白相间的狗", "一条黑白色的狗"),
];

pub fn builtin_synonyms(lang: Lang) -> Vec<(String, String)> {
    let src: &[(&str, &str)] = match lang {
        Lang::En => &SYNONYMS_EN,
        Lang::Zh => &SYNONYMS_ZH,
    };
    src.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[derive(Clone, Debug, Serialize)]
pub struct SynonymProbe {
    pub a: String,
    pub b: String,
    /// 1 − cos between the two phrases' embeddings.
    pub text_distance: f64,
    /// Dataset ids of the top image each phrase retrieves.
    pub image_a: String,
    pub image_b: String,
    /// 1 − cos between those two images (0 when it is the same image).
    pub image_distance: f64,
    /// Images shared by the two top-5 lists.
    pub top5_overlap: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Diagnostics {
    pub n_images: usize,
    pub n_texts: usize,
    /// ‖mean(image) − mean(text)‖ over normalised embeddings.
    pub modality_gap: f64,
    /// Cosine between the two centroids.
    pub centroid_cosine: f64,
    /// Mean cosine over distinct pairs within each modality.
    pub image_mean_pairwise_cosine: f64,
    pub text_mean_pairwise_cosine: f64,
    pub positive_mean: f64,
    pub positive_std: f64,
    pub negative_mean: f64,
    pub negative_std: f64,
    /// P(a random positive pair scores above a random negative pair).
    pub positive_over_negative_auc: f64,
    pub synonyms: Vec<SynonymProbe>,
    /// Raw similarities for the histogram plot (not serialised).
    #[serde(skip)]
    pub positives: Vec<f32>,
    #[serde(skip)]
    pub negatives: Vec<f32>,
}

fn centroid(v: &[Vec<f32>]) -> Vec<f64> {
    let mut c = vec![0f64; v[0].len()];
    for x in v {
        for (a, b) in c.iter_mut().zip(x) {
            *a += *b as f64;
        }
    }
    c.iter().map(|a| a / v.len() as f64).collect()
}

/// Mean of x_i·x_j over i ≠ j, from ‖Σx‖² = Σ_i ‖x_i‖² + Σ_{i≠j} x_i·x_j.
fn mean_pairwise_cosine(v: &[Vec<f32>]) -> f64 {
    let n = v.len() as f64;
    if n < 2.0 {
        return f64::NAN;
    }
    let c = centroid(v);
    let sum_sq: f64 = c.iter().map(|x| (x * n).powi(2)).sum();
    let self_sq: f64 = v
        .iter()
        .map(|x| x.iter().map(|a| (*a as f64).powi(2)).sum::<f64>())
        .sum();
    (sum_sq - self_sq) / (n * (n - 1.0))
}

fn mean_std(v: &[f32]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().map(|x| *x as f64).sum::<f64>() / n;
    let var = v.iter().map(|x| (*x as f64 - m).powi(2)).sum::<f64>() / n;
    (m, var.sqrt())
}

/// Mann–Whitney AUC of positives over negatives (ties count one half).
fn auc(pos: &[f32], neg: &[f32]) -> f64 {
    let mut neg = neg.to_vec();
    neg.sort_by(f32::total_cmp);
    let mut total = 0f64;
    for &p in pos {
        let below = neg.partition_point(|&x| x < p);
        let upto = neg.partition_point(|&x| x <= p);
        total += below as f64 + 0.5 * (upto - below) as f64;
    }
    total / (pos.len() as f64 * neg.len() as f64)
}

fn top(scores: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

pub fn diagnose(
    ctx: &mut EmbedContext,
    data: &EmbeddedPairs,
    synonyms: &[(String, String)],
) -> Result<Diagnostics> {
    let (imgs, txts) = (&data.images, &data.texts);
    let ci = centroid(imgs);
    let ct = centroid(txts);
    let gap = ci
        .iter()
        .zip(&ct)
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm = |c: &[f64]| c.iter().map(|x| x * x).sum::<f64>().sqrt();
    let ccos = ci.iter().zip(&ct).map(|(a, b)| a * b).sum::<f64>() / (norm(&ci) * norm(&ct));
    let scores = score_matrix(txts, imgs)?;
    let n_img = imgs.len();
    let mut positives = Vec::with_capacity(txts.len());
    let mut negatives = Vec::with_capacity(txts.len() * n_img.saturating_sub(1));
    for (t, &img) in data.set.caption_image.iter().enumerate() {
        for (i, &s) in scores[t * n_img..(t + 1) * n_img].iter().enumerate() {
            if i == img {
                positives.push(s);
            } else {
                negatives.push(s);
            }
        }
    }
    let (pm, ps) = mean_std(&positives);
    let (nm, ns) = mean_std(&negatives);
    let mut probes = Vec::new();
    if !synonyms.is_empty() {
        let phrases: Vec<String> = synonyms
            .iter()
            .flat_map(|(a, b)| [a.clone(), b.clone()])
            .collect();
        let emb = ctx.texts(&phrases)?;
        let sims = score_matrix(&emb, imgs)?;
        for (p, (a, b)) in synonyms.iter().enumerate() {
            let (ea, eb) = (&emb[2 * p], &emb[2 * p + 1]);
            let ta = top(&sims[2 * p * n_img..(2 * p + 1) * n_img], 5);
            let tb = top(&sims[(2 * p + 1) * n_img..(2 * p + 2) * n_img], 5);
            probes.push(SynonymProbe {
                a: a.clone(),
                b: b.clone(),
                text_distance: 1.0 - dot(ea, eb) as f64,
                image_a: data.set.image_ids[ta[0]].clone(),
                image_b: data.set.image_ids[tb[0]].clone(),
                image_distance: if ta[0] == tb[0] {
                    0.0
                } else {
                    1.0 - dot(&imgs[ta[0]], &imgs[tb[0]]) as f64
                },
                top5_overlap: ta.iter().filter(|i| tb.contains(i)).count(),
            });
        }
    }
    Ok(Diagnostics {
        n_images: n_img,
        n_texts: txts.len(),
        modality_gap: gap,
        centroid_cosine: ccos,
        image_mean_pairwise_cosine: mean_pairwise_cosine(imgs),
        text_mean_pairwise_cosine: mean_pairwise_cosine(txts),
        positive_mean: pm,
        positive_std: ps,
        negative_mean: nm,
        negative_std: ns,
        positive_over_negative_auc: auc(&positives, &negatives),
        synonyms: probes,
        positives,
        negatives,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairwise_cosine_matches_brute_force() {
        let v: Vec<Vec<f32>> = vec![vec![1.0, 0.0], vec![0.6, 0.8], vec![0.0, -1.0]];
        let mut s = 0.0;
        for i in 0..3 {
            for j in 0..3 {
                if i != j {
                    s += dot(&v[i], &v[j]) as f64;
                }
            }
        }
        assert!((mean_pairwise_cosine(&v) - s / 6.0).abs() < 1e-12);
    }

    #[test]
    fn auc_counts_ties_as_half() {
        assert_eq!(auc(&[1.0], &[0.0, 1.0, 2.0]), 0.5);
        assert_eq!(auc(&[3.0, 3.0], &[0.0]), 1.0);
    }
}
