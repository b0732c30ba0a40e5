//! `clasp eval caption`: a vision-language model captions a dataset's images
//! and the captions are scored against the references with pycocoevalcap's
//! metrics (see [`super::caption`]), English on PTB tokens and Chinese on
//! characters. A grounding control scores the same captions against the
//! references of other photos (a fixed derangement: image i against image
//! i + ⌊n/2⌋ mod n): a model that learned only the caption style scores the
//! same there.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::caption::{char_tokenize, ptb_tokenize, score, CaptionScores};
use super::chair::{hallucination, Hallucination};
use crate::data::{Lang, PairSet};
use crate::llm::GenerateOptions;
use crate::progress::Progress;
use crate::vlm::model::{DESCRIBE_EN, DESCRIBE_ZH};
use crate::vlm::native::NativeModel;
use crate::vlm::Vlm;
use crate::Result;

/// One image's caption and references.
#[derive(Debug, Clone, Serialize)]
pub struct Captioned {
    pub image: String,
    pub caption: String,
    pub references: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CaptionEval {
    pub lang: &'static str,
    pub images: usize,
    /// Against each image's own references.
    pub scores: CaptionScores,
    /// Against the references of a deranged image (the grounding control).
    pub wrong_photos: CaptionScores,
    pub captions: Vec<Captioned>,
    /// Images that could not be read, with the error.
    pub failed: Vec<(String, String)>,
    /// CHAIR (English captions), after [`CaptionEval::with_chair`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chair: Option<Hallucination>,
}

impl CaptionEval {
    /// Adds CHAIR (English only: its word list is English) against each
    /// image's objects, from `instances` (COCO's annotations, by file name)
    /// and the references.
    pub fn with_chair(mut self, instances: Option<&BTreeMap<String, BTreeSet<String>>>) -> Self {
        if self.lang == Lang::En.as_str() {
            let images: Vec<&str> = self.captions.iter().map(|c| c.image.as_str()).collect();
            let caps: Vec<&str> = self.captions.iter().map(|c| c.caption.as_str()).collect();
            let refs: Vec<&[String]> = self.captions.iter().map(|c| &c.references[..]).collect();
            self.chair = Some(hallucination(&images, &caps, &refs, instances));
        }
        self
    }
}

/// The retrieval of BCIF's contrastive heads on the first `limit` images of
/// `set` and all their captions (text→image and image→text Recall@1/5/10,
/// CLIP_benchmark's definitions, as `clasp eval` reports them).
pub fn heads_recall(
    vlm: &Vlm,
    heads: &crate::vlm::heads::Heads,
    set: &PairSet,
    limit: Option<usize>,
    batch: usize,
) -> Result<crate::metrics::RetrievalMetrics> {
    use crate::vlm::heads::{image_side, text_side};
    let n = limit.unwrap_or(set.images.len()).min(set.images.len());
    let batch = batch.max(1);
    let mut image_feats: Vec<Vec<f32>> = Vec::with_capacity(n);
    for chunk in set.images[..n].chunks(batch) {
        let px = chunk
            .iter()
            .map(|src| {
                let img = crate::preprocess::image::decode_image(&src.read()?, &src.path())?;
                vlm.image_processor().process(&img)
            })
            .collect::<Result<Vec<_>>>()?;
        let tokens = vlm.image_features(&vlm.pixel_batch(&px)?)?;
        image_feats.extend(image_side(&tokens, &heads.image)?.to_vec2::<f32>()?);
    }
    let (mut texts, mut owner) = (Vec::new(), Vec::new());
    for (c, &i) in set.caption_image.iter().enumerate() {
        if i < n {
            texts.push(vlm.tokenizer.encode(set.captions[c].trim(), false)?);
            owner.push(i);
        }
    }
    let mut text_feats: Vec<Vec<f32>> = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(32) {
        text_feats.extend(text_side(vlm, chunk, &heads.text, false)?.to_vec2::<f32>()?);
    }
    let scores = crate::retrieval::score_matrix(&text_feats, &image_feats)?;
    let (t2i, i2t) = crate::metrics::retrieval_ranks(&scores, n, &owner);
    Ok(crate::metrics::RetrievalMetrics::from_ranks(
        &t2i,
        &i2t,
        &[1, 5, 10],
    ))
}

/// The tokenizer the scores use for a language.
pub fn tokenize(lang: Lang, text: &str) -> String {
    match lang {
        Lang::En => ptb_tokenize(text),
        Lang::Zh => char_tokenize(text),
    }
}

/// The default captioning instruction in a language.
pub fn instruction(lang: Lang) -> &'static str {
    match lang {
        Lang::En => DESCRIBE_EN,
        Lang::Zh => DESCRIBE_ZH,
    }
}

/// Scores one caption per image against references, and against a fixed
/// derangement of the references.
pub fn score_captions(
    lang: Lang,
    captions: &[String],
    references: &[Vec<String>],
) -> (CaptionScores, CaptionScores) {
    let cands: Vec<String> = captions.iter().map(|c| tokenize(lang, c)).collect();
    let refs: Vec<Vec<String>> = references
        .iter()
        .map(|rs| rs.iter().map(|r| tokenize(lang, r)).collect())
        .collect();
    let n = refs.len();
    let shift = (n / 2).max(1);
    let deranged: Vec<Vec<String>> = (0..n).map(|i| refs[(i + shift) % n].clone()).collect();
    (score(&cands, &refs), score(&cands, &deranged))
}

/// The reference captions of the first `n` images of `set`.
fn references(set: &PairSet, n: usize) -> Vec<Vec<String>> {
    set.references()
        .into_iter()
        .take(n)
        .map(|rs| rs.into_iter().map(str::to_string).collect())
        .collect()
}

/// Captions the first `limit` images of `set` (all with `None`) with the
/// user turn `<image>` + `prompt` (the language's instruction by default)
/// and scores them.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_captions(
    vlm: &Vlm,
    set: &PairSet,
    lang: Lang,
    prompt: Option<&str>,
    opts: &GenerateOptions,
    batch: usize,
    limit: Option<usize>,
    progress: &dyn Progress,
) -> Result<CaptionEval> {
    let n = limit.unwrap_or(set.images.len()).min(set.images.len());
    let user = Vlm::caption_turn(prompt.unwrap_or(instruction(lang)));
    let results =
        crate::vlm::caption::caption_images(vlm, &set.images[..n], &user, opts, batch, progress)?;
    scored(set, lang, n, results)
}

/// [`evaluate_captions`] for a native model: each photo's codes in the
/// same user turn, text generated with the image tokens suppressed, one
/// photo at a time.
pub fn evaluate_native_captions(
    m: &NativeModel,
    set: &PairSet,
    lang: Lang,
    prompt: Option<&str>,
    opts: &GenerateOptions,
    limit: Option<usize>,
    progress: &dyn Progress,
) -> Result<CaptionEval> {
    let n = limit.unwrap_or(set.images.len()).min(set.images.len());
    let user = Vlm::caption_turn(prompt.unwrap_or(instruction(lang)));
    progress.start("captioning", n as u64);
    let results = set.images[..n]
        .iter()
        .map(|src| {
            let r = m.caption_source(src, &user, opts);
            progress.inc(1);
            r
        })
        .collect();
    progress.finish();
    scored(set, lang, n, results)
}

/// The first `n` images' captions (or errors) scored against their
/// references and against the wrong photos'.
fn scored(
    set: &PairSet,
    lang: Lang,
    n: usize,
    results: Vec<Result<crate::llm::Generation>>,
) -> Result<CaptionEval> {
    let images = &set.images[..n];
    let refs = references(set, n);
    let (mut captions, mut kept_refs, mut rows, mut failed) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for ((src, r), rs) in images.iter().zip(results).zip(refs) {
        match r {
            Ok(g) if !rs.is_empty() => {
                rows.push(Captioned {
                    image: src.display_name(),
                    caption: g.text.trim().to_string(),
                    references: rs.clone(),
                });
                captions.push(g.text.trim().to_string());
                kept_refs.push(rs);
            }
            Ok(_) => {}
            Err(e) => failed.push((src.display_name(), e.to_string())),
        }
    }
    if captions.is_empty() {
        // Every image failed: say which and why, the first few by name.
        let shown: Vec<String> = failed
            .iter()
            .take(3)
            .map(|(name, e)| format!("{name}: {e}"))
            .collect();
        let more = failed.len().saturating_sub(shown.len());
        return Err(crate::Error::Report(format!(
            "no image could be captioned and scored ({} of {n} failed{}): {}{}",
            failed.len(),
            if n == 0 {
                "; the data set has no images"
            } else {
                ""
            },
            shown.join("; "),
            if more > 0 {
                format!("; and {more} more")
            } else {
                String::new()
            }
        )));
    }
    let (scores, wrong_photos) = score_captions(lang, &captions, &kept_refs);
    Ok(CaptionEval {
        lang: lang.as_str(),
        images: captions.len(),
        scores,
        wrong_photos,
        captions: rows,
        failed,
        chair: None,
    })
}

/// The caption prior: the language model alone, asked the instruction with
/// no image, greedy; the same caption is then scored for every image.
pub fn prior_caption(
    vlm: &Vlm,
    lang: Lang,
    prompt: Option<&str>,
    opts: &GenerateOptions,
) -> Result<String> {
    let ids = vlm.tokenizer.encode_chat(
        &[crate::llm::Message::new(
            "user",
            prompt.unwrap_or(instruction(lang)),
        )],
        true,
    )?;
    let g = crate::llm::generate(&vlm.llm, &vlm.tokenizer, &ids, opts, &mut |_| true)?;
    Ok(g.text.trim().to_string())
}

/// [`evaluate_captions`] for the prior: one caption for every image.
pub fn evaluate_prior(
    vlm: &Vlm,
    set: &PairSet,
    lang: Lang,
    prompt: Option<&str>,
    opts: &GenerateOptions,
    limit: Option<usize>,
) -> Result<CaptionEval> {
    let caption = prior_caption(vlm, lang, prompt, opts)?;
    let n = limit.unwrap_or(set.images.len()).min(set.images.len());
    let refs = references(set, n);
    let (rows, kept): (Vec<Captioned>, Vec<Vec<String>>) = set.images[..n]
        .iter()
        .zip(refs)
        .filter(|(_, r)| !r.is_empty())
        .map(|(src, r)| {
            (
                Captioned {
                    image: src.display_name(),
                    caption: caption.clone(),
                    references: r.clone(),
                },
                r,
            )
        })
        .unzip();
    let captions = vec![caption; kept.len()];
    let (scores, wrong_photos) = score_captions(lang, &captions, &kept);
    Ok(CaptionEval {
        lang: lang.as_str(),
        images: kept.len(),
        scores,
        wrong_photos,
        captions: rows,
        failed: Vec::new(),
        chair: None,
    })
}

/// report.md: the scores, and example images with their generated and
/// reference captions.
pub fn write_report(
    dir: &std::path::Path,
    model: &str,
    dataset: &str,
    e: &CaptionEval,
) -> Result<()> {
    use std::fmt::Write as _;
    std::fs::create_dir_all(dir).map_err(|err| crate::Error::io(dir, err))?;
    let mut md = String::new();
    let row = |name: &str, s: &CaptionScores| {
        format!(
            "| {name} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |",
            s.cider_d, s.bleu[0], s.bleu[1], s.bleu[2], s.bleu[3], s.rouge_l
        )
    };
    let _ = writeln!(
        md,
        "# Captioning: {model}\n\n{dataset}, {} images, language {}.\n",
        e.images, e.lang
    );
    let _ = writeln!(
        md,
        "| scored against | CIDEr-D | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | ROUGE-L |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    let _ = writeln!(md, "{}", row("their own references", &e.scores));
    let _ = writeln!(
        md,
        "{}",
        row(
            "other photos' references (grounding control)",
            &e.wrong_photos
        )
    );
    let _ = writeln!(
        md,
        "\nA model that only learned the captions' style scores the same on both rows.\n"
    );
    if let Some(h) = &e.chair {
        let _ = writeln!(
            md,
            "Object hallucination (CHAIR, lower is better): CHAIR_i {:.3}, CHAIR_s {:.3} over {} object mentions; against other photos' objects {:.3} and {:.3}. Objects from {}.\n",
            h.own.chair_i,
            h.own.chair_s,
            h.own.mentions,
            h.wrong_photos.chair_i,
            h.wrong_photos.chair_s,
            h.own.truth.describe()
        );
    }
    let _ = writeln!(md, "## Examples\n");
    for c in e.captions.iter().take(16) {
        // Absolute, so the report shows its images wherever it is opened from.
        let img = std::fs::canonicalize(&c.image)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| c.image.clone());
        let _ = writeln!(md, "![]({img})\n\n- **generated:** {}", c.caption);
        for r in &c.references {
            let _ = writeln!(md, "- reference: {r}");
        }
        md.push('\n');
    }
    if !e.failed.is_empty() {
        let _ = writeln!(md, "## Images that could not be read\n");
        for (p, err) in &e.failed {
            let _ = writeln!(md, "- {p}: {err}");
        }
    }
    let path = dir.join("report.md");
    std::fs::write(&path, md).map_err(|err| crate::Error::io(&path, err))?;
    let json = dir.join("captions.json");
    let text =
        serde_json::to_string_pretty(e).map_err(|err| crate::Error::Report(err.to_string()))?;
    std::fs::write(&json, text).map_err(|err| crate::Error::io(&json, err))
}

/// Dev captioning metrics of a saved vision-language checkpoint, for
/// evaluation during training: greedy captions (at most 32 new tokens,
/// batches of 8) of the first `limit` images of `set` (all with 0), scored
/// against their own references and against a deranged image's (the
/// grounding control), as `clasp eval caption` scores them.
pub fn checkpoint_caption_metrics(
    ckpt: &std::path::Path,
    set: &PairSet,
    lang: Lang,
    limit: usize,
    device: &candle_core::Device,
) -> Result<serde_json::Value> {
    let vlm = Vlm::load(ckpt, device)?;
    let opts = GenerateOptions {
        max_new_tokens: 32,
        ..Default::default()
    };
    let limit = (limit > 0).then_some(limit);
    let e = evaluate_captions(
        &vlm,
        set,
        lang,
        None,
        &opts,
        8,
        limit,
        &crate::progress::Silent,
    )?;
    Ok(serde_json::json!({
        "images": e.images,
        "cider_d": e.scores.cider_d,
        "bleu_4": e.scores.bleu[3],
        "rouge_l": e.scores.rouge_l,
        "wrong_photos_cider_d": e.wrong_photos.cider_d,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wrong_photo_control_scores_a_grounded_model_lower_and_a_constant_one_the_same() {
        let refs: Vec<Vec<String>> = [
            "a dog runs on the grass",
            "two children play in the snow",
            "a man rides a red bike",
            "a woman swims in the sea",
        ]
        .iter()
        .map(|r| vec![r.to_string()])
        .collect();
        // Captions that describe their own photo.
        let grounded: Vec<String> = refs.iter().map(|r| r[0].clone()).collect();
        let (own, wrong) = score_captions(Lang::En, &grounded, &refs);
        assert!(
            own.cider_d > 5.0 && wrong.cider_d < 1.0,
            "{} {}",
            own.cider_d,
            wrong.cider_d
        );
        // One caption for every photo: the derangement cannot tell.
        let constant = vec!["a dog in the snow".to_string(); 4];
        let (own, wrong) = score_captions(Lang::En, &constant, &refs);
        let total = |s: &CaptionScores| s.per_image.iter().map(|p| p.cider_d).sum::<f64>();
        assert!((total(&own) - total(&wrong)).abs() < 1e-9);
    }
}
