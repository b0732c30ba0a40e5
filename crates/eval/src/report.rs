//! `--report DIR`: report.md with the numbers and PNG plots beside it.

use std::fmt::Write as _;
use std::path::Path;

use super::diagnose::Diagnostics;
use super::plot;
use super::retrieval::RetrievalOutcome;
use super::zeroshot::ZeroShotOutcome;
use crate::data::DataIssue;
use crate::{Error, Result};

/// Largest K drawn in recall curves.
const CURVE_K: usize = 50;

fn write_atomic(path: &Path, body: &str) -> Result<()> {
    let tmp = path.with_extension("md.tmp");
    std::fs::write(&tmp, body).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn issues_section(md: &mut String, issues: &[DataIssue]) {
    if issues.is_empty() {
        return;
    }
    let _ = writeln!(md, "\n## Data issues ({})\n", issues.len());
    for i in issues.iter().take(200) {
        let _ = writeln!(md, "- `{}`: {}", i.loc, i.message);
    }
    if issues.len() > 200 {
        let _ = writeln!(md, "- … and {} more", issues.len() - 200);
    }
}

pub fn retrieval(dir: &Path, model: &str, dataset: &str, r: &RetrievalOutcome) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let curve = |d: &super::metrics::DirectionRanks| {
        (1..=CURVE_K.min(d.n_candidates))
            .map(|k| d.recall_at(k))
            .collect::<Vec<_>>()
    };
    plot::recall_curves(
        &dir.join("recall_at_k.png"),
        "Recall@K",
        &[
            ("text→image", curve(&r.image_retrieval)),
            ("image→text", curve(&r.text_retrieval)),
        ],
    )?;
    let n_img = r.data.images.len();
    let (mut pos, mut neg) = (Vec::new(), Vec::new());
    for (t, &img) in r.data.set.caption_image.iter().enumerate() {
        for (i, &s) in r.scores[t * n_img..(t + 1) * n_img].iter().enumerate() {
            if i == img {
                pos.push(s)
            } else {
                neg.push(s)
            }
        }
    }
    plot::histograms(
        &dir.join("similarity_hist.png"),
        "Cosine similarity of pairs",
        "cosine",
        &[("positive pairs", &pos), ("negative pairs", &neg)],
    )?;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Retrieval: {dataset}\n\nModel: `{model}`  \nImages: {}  \nTexts: {}\n",
        n_img,
        r.data.texts.len()
    );
    let _ = writeln!(md, "| metric | value |\n|---|---|");
    for (k, v) in r.metrics.to_pairs() {
        let _ = writeln!(md, "| {k} | {v:.4} |");
    }
    let _ = writeln!(
        md,
        "\n![Recall@K](recall_at_k.png)\n\n![similarity](similarity_hist.png)"
    );
    issues_section(&mut md, &r.data.set.issues);
    write_atomic(&dir.join("report.md"), &md)
}

pub fn zeroshot(dir: &Path, model: &str, dataset: &str, z: &ZeroShotOutcome) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    plot::confusion_matrix(
        &dir.join("confusion.png"),
        "Confusion (rows: true, columns: predicted)",
        &z.classes,
        &z.metrics.confusion,
    )?;
    let m = &z.metrics;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Zero-shot classification: {dataset}\n\nModel: `{model}`  \nImages: {}\n",
        z.n_images
    );
    let _ = writeln!(
        md,
        "| metric | value |\n|---|---|\n| acc1 | {:.4} |",
        m.acc1
    );
    if let Some(a5) = m.acc5 {
        let _ = writeln!(md, "| acc5 | {a5:.4} |");
    }
    let _ = writeln!(
        md,
        "| mean_per_class_recall | {:.4} |\n\n| class | recall |\n|---|---|",
        m.mean_per_class_recall
    );
    for (c, r) in z.classes.iter().zip(&m.per_class_recall) {
        let _ = writeln!(
            md,
            "| {c} | {} |",
            r.map(|x| format!("{x:.4}")).unwrap_or_else(|| "–".into())
        );
    }
    let _ = writeln!(md, "\n![confusion](confusion.png)");
    issues_section(&mut md, &z.issues);
    write_atomic(&dir.join("report.md"), &md)
}

pub fn diagnostics(
    dir: &Path,
    model: &str,
    dataset: &str,
    d: &Diagnostics,
    issues: &[DataIssue],
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    plot::histograms(
        &dir.join("similarity_hist.png"),
        "Positive vs negative pair similarity",
        "cosine",
        &[
            ("positive pairs", &d.positives),
            ("negative pairs", &d.negatives),
        ],
    )?;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Alignment diagnostics: {dataset}\n\nModel: `{model}`  \nImages: {}  \nTexts: {}\n",
        d.n_images, d.n_texts
    );
    let _ = writeln!(md, "| measure | value |\n|---|---|");
    for (k, v) in [
        ("modality gap ‖μ_img − μ_txt‖", d.modality_gap),
        ("centroid cosine", d.centroid_cosine),
        ("image mean pairwise cosine", d.image_mean_pairwise_cosine),
        ("text mean pairwise cosine", d.text_mean_pairwise_cosine),
        ("positive mean ± std", d.positive_mean),
        ("negative mean ± std", d.negative_mean),
        ("AUC positive > negative", d.positive_over_negative_auc),
    ] {
        let extra = match k {
            "positive mean ± std" => format!(" ± {:.4}", d.positive_std),
            "negative mean ± std" => format!(" ± {:.4}", d.negative_std),
            _ => String::new(),
        };
        let _ = writeln!(md, "| {k} | {v:.4}{extra} |");
    }
    if !d.synonyms.is_empty() {
        let _ = writeln!(md, "\n## Near-synonym probe\n\n| phrase A | phrase B | text distance | top image A | top image B | image distance | top-5 overlap |\n|---|---|---|---|---|---|---|");
        for s in &d.synonyms {
            let _ = writeln!(
                md,
                "| {} | {} | {:.4} | {} | {} | {:.4} | {}/5 |",
                s.a, s.b, s.text_distance, s.image_a, s.image_b, s.image_distance, s.top5_overlap
            );
        }
    }
    let _ = writeln!(md, "\n![similarity](similarity_hist.png)");
    issues_section(&mut md, issues);
    write_atomic(&dir.join("report.md"), &md)
}
