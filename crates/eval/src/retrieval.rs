//! Image–text retrieval evaluation.

use candle_core::{Device, Tensor};

use super::embed::EmbedContext;
use super::metrics::{retrieval_ranks, DirectionRanks, RetrievalMetrics};
use crate::data::{DataIssue, Loc, PairSet};
use crate::Result;

/// A pair set with the embeddings of everything that could be embedded.
pub struct EmbeddedPairs {
    /// The set without images that failed to load (and their captions).
    pub set: PairSet,
    pub images: Vec<Vec<f32>>,
    pub texts: Vec<Vec<f32>>,
    pub cache_hits: usize,
}

/// Embeds a pair set's images and captions; images that fail are dropped
/// with their captions and recorded as issues.
pub fn embed_pairs(ctx: &mut EmbedContext, mut set: PairSet) -> Result<EmbeddedPairs> {
    let imgs = ctx.images(&set.images)?;
    let bad: Vec<(usize, DataIssue)> = imgs
        .failures
        .iter()
        .map(|(i, e)| {
            (
                *i,
                DataIssue {
                    loc: Loc::new(&set.images[*i].path(), 0),
                    message: format!("image `{}` dropped: {e}", set.image_ids[*i]),
                    dropped_images: 0,
                    dropped_captions: 0,
                },
            )
        })
        .collect();
    let images: Vec<Vec<f32>> = imgs.vectors.into_iter().flatten().collect();
    set.remove_images(&bad);
    let texts = ctx.texts(&set.captions)?;
    let hits = imgs.cache_hits;
    Ok(EmbeddedPairs {
        set,
        images,
        texts,
        cache_hits: hits,
    })
}

/// `a @ b^T` for row-major vectors: [a.len(), b.len()] row-major.
pub fn score_matrix(a: &[Vec<f32>], b: &[Vec<f32>]) -> Result<Vec<f32>> {
    if a.is_empty() || b.is_empty() {
        return Ok(Vec::new());
    }
    let d = a[0].len();
    let ta = Tensor::from_vec(a.concat(), (a.len(), d), &Device::Cpu)?;
    let tb = Tensor::from_vec(b.concat(), (b.len(), d), &Device::Cpu)?;
    Ok(ta.matmul(&tb.t()?)?.flatten_all()?.to_vec1::<f32>()?)
}

pub struct RetrievalOutcome {
    pub data: EmbeddedPairs,
    /// texts × images scores, row-major.
    pub scores: Vec<f32>,
    pub image_retrieval: DirectionRanks,
    pub text_retrieval: DirectionRanks,
    pub metrics: RetrievalMetrics,
}

/// Embeds and scores a pair set, as CLIP_benchmark's `zeroshot_retrieval`.
pub fn evaluate_retrieval(
    ctx: &mut EmbedContext,
    set: PairSet,
    ks: &[usize],
) -> Result<RetrievalOutcome> {
    let data = embed_pairs(ctx, set)?;
    let scores = score_matrix(&data.texts, &data.images)?;
    let (t2i, i2t) = retrieval_ranks(&scores, data.images.len(), &data.set.caption_image);
    let metrics = RetrievalMetrics::from_ranks(&t2i, &i2t, ks);
    Ok(RetrievalOutcome {
        data,
        scores,
        image_retrieval: t2i,
        text_retrieval: i2t,
        metrics,
    })
}

/// Retrieval metrics of a checkpoint on a dev set, as `clasp eval` computes
/// them, as a JSON object of metric name to value (a training run's dev
/// evaluation hook).
pub fn checkpoint_metrics(
    checkpoint: &std::path::Path,
    set: &crate::data::PairSet,
    device: &Device,
) -> Result<serde_json::Value> {
    let enc = crate::Encoder::load(&checkpoint.to_string_lossy(), device)?;
    let mut ctx = EmbedContext {
        encoder: &enc,
        cache: None,
        model_key: None,
        batch_size: 64,
        progress: &crate::progress::Silent,
    };
    let r = evaluate_retrieval(&mut ctx, set.clone(), &super::RECALL_KS)?;
    Ok(serde_json::Value::Object(
        r.metrics
            .to_pairs()
            .into_iter()
            .map(|(k, v)| (k, serde_json::json!(v)))
            .collect(),
    ))
}
