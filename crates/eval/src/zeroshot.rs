//! Zero-shot classification with prompt ensembling.

use super::embed::EmbedContext;
use super::metrics::{classification_metrics, ClassificationMetrics};
use super::retrieval::score_matrix;
use crate::data::{ClassSet, DataIssue, Loc};
use crate::preprocess::prompts;
use crate::Result;

/// CLIP's prompt ensemble: for each class, embed every template filled with
/// the class name, average the normalised embeddings and normalise the mean.
pub fn zeroshot_classifier(
    ctx: &mut EmbedContext,
    classes: &[String],
    templates: &[String],
) -> Result<Vec<Vec<f32>>> {
    let emb = ctx.texts(&prompts::class_prompts(classes, templates))?;
    Ok(clasp_core::zeroshot::ensemble(&emb, templates.len()))
}

pub struct ZeroShotOutcome {
    pub metrics: ClassificationMetrics,
    pub classes: Vec<String>,
    pub n_images: usize,
    pub issues: Vec<DataIssue>,
    pub cache_hits: usize,
}

/// Classifies every image of `set` against prompts for `class_names`
/// (the names used in prompts, parallel to `set.classes`).
pub fn evaluate_zeroshot(
    ctx: &mut EmbedContext,
    set: ClassSet,
    class_names: &[String],
    templates: &[String],
) -> Result<ZeroShotOutcome> {
    let classifier = zeroshot_classifier(ctx, class_names, templates)?;
    let imgs = ctx.images(&set.images)?;
    let mut issues = set.issues.clone();
    for (i, e) in &imgs.failures {
        issues.push(DataIssue {
            loc: Loc::new(&set.images[*i].path(), 0),
            message: format!("image dropped: {e}"),
            dropped_images: 1,
            dropped_captions: 0,
        });
    }
    let mut vectors = Vec::new();
    let mut targets = Vec::new();
    for (v, &label) in imgs.vectors.into_iter().zip(&set.labels) {
        if let Some(v) = v {
            vectors.push(v);
            targets.push(label);
        }
    }
    // CLIP_benchmark scales by 100; ranking does not depend on it.
    let logits = score_matrix(&vectors, &classifier)?;
    let metrics = classification_metrics(&logits, classifier.len(), &targets);
    Ok(ZeroShotOutcome {
        metrics,
        classes: class_names.to_vec(),
        n_images: targets.len(),
        issues,
        cache_hits: imgs.cache_hits,
    })
}
