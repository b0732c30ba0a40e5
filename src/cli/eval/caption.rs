//! `clasp eval caption`: a vision-language model's captions scored with BLEU, ROUGE-L and CIDEr-D against the references, and against another photo's.

use super::*;

#[derive(Args, Debug)]
pub struct CaptionArgs {
    /// A VLM checkpoint folder (LlavaForConditionalGeneration layout), or a native model
    /// (Emu3ForConditionalGeneration, from `clasp assemble --native`).
    #[arg(long, short)]
    pub model: PathBuf,
    /// Dataset: FORMAT:PATH or PATH, with captions as references.
    #[arg(long, short)]
    pub dataset: String,
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Caption language: the instruction's and the references' [default: en].
    #[arg(long, default_value = "en")]
    pub lang: String,
    /// Score only the first N images.
    #[arg(long)]
    pub limit: Option<usize>,
    /// The instruction after `<image>` [default: "Describe the image." or its Chinese].
    #[arg(long)]
    pub prompt: Option<String>,
    /// The caption prior: the language model alone, asked with no image.
    #[arg(long)]
    pub no_image: bool,
    /// Images captioned together.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Tokens generated per caption at most.
    #[arg(long, default_value_t = 48)]
    pub max_tokens: usize,
    /// COCO instance annotations (instances_*.json) for CHAIR's objects; found
    /// beside a COCO captions file by default. Without them CHAIR counts the
    /// objects the references mention.
    #[arg(long)]
    pub instances: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Write report.md (with example images and their captions) and captions.json here.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

pub(super) fn caption_cmd(a: CaptionArgs) -> Result<ExitCode> {
    use clasp::eval::captioning;
    let lang = Lang::parse(&a.lang)?;
    let spec = DatasetSpec::parse(&a.dataset)?;
    let set = data::load_pairs(&spec, Split::parse(&a.split)?, lang, None)?;
    report_issues(&set.issues, a.json);
    let opts = clasp::llm::GenerateOptions {
        max_new_tokens: a.max_tokens,
        ..Default::default()
    };
    let t0 = Instant::now();
    if clasp::vlm::native::is_native(&a.model) {
        if a.no_image {
            bail!("--no-image: the caption prior is measured on a bridge model's language model; for a native model, caption with the assembled model or the wrong photos' scores");
        }
        let m = clasp::vlm::native::NativeModel::load(&a.model, &candle_core::Device::Cpu)?;
        let e = captioning::evaluate_native_captions(
            &m,
            &set,
            lang,
            a.prompt.as_deref(),
            &opts,
            a.limit,
            &BarProgress::default(),
        )?;
        return finish(&a, &spec, &set, e, None, t0.elapsed().as_secs_f64());
    }
    let vlm = clasp::vlm::Vlm::load(&a.model, &candle_core::Device::Cpu)?;
    let e = if a.no_image {
        captioning::evaluate_prior(&vlm, &set, lang, a.prompt.as_deref(), &opts, a.limit)?
    } else {
        captioning::evaluate_captions(
            &vlm,
            &set,
            lang,
            a.prompt.as_deref(),
            &opts,
            a.batch_size,
            a.limit,
            &BarProgress::default(),
        )?
    };
    let secs = t0.elapsed().as_secs_f64();
    // A run with BCIF's contrastive branch left its heads beside the model.
    let heads = match clasp::vlm::heads::Heads::load(&a.model, vlm.device())? {
        Some(h) if !a.no_image => Some(captioning::heads_recall(
            &vlm,
            &h,
            &set,
            a.limit,
            a.batch_size,
        )?),
        _ => None,
    };
    finish(&a, &spec, &set, e, heads, secs)
}

/// CHAIR, the report and the printed scores of an evaluation.
fn finish(
    a: &CaptionArgs,
    spec: &DatasetSpec,
    set: &clasp::data::PairSet,
    e: clasp::eval::captioning::CaptionEval,
    heads: Option<clasp::eval::metrics::RetrievalMetrics>,
    secs: f64,
) -> Result<ExitCode> {
    use clasp::eval::captioning;
    let instances = match a
        .instances
        .clone()
        .or_else(|| clasp::data::objects::instances_beside(&spec.path))
    {
        Some(p) => Some(clasp::eval::chair::coco_instances(&p)?),
        None => None,
    };
    let e = e.with_chair(instances.as_ref());
    if let Some(dir) = &a.report {
        captioning::write_report(dir, &a.model.display().to_string(), &set.name, &e)?;
        note!("wrote {}", dir.join("report.md").display());
    }
    let metrics = |s: &clasp::eval::caption::CaptionScores| {
        json!({"cider_d": s.cider_d, "bleu_1": s.bleu[0], "bleu_2": s.bleu[1], "bleu_3": s.bleu[2],
               "bleu_4": s.bleu[3], "rouge_l": s.rouge_l})
    };
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "model": a.model.display().to_string(), "dataset": set.name, "lang": e.lang,
                "images": e.images, "no_image": a.no_image, "seconds": secs,
                "images_per_s": e.images as f64 / secs,
                "scores": metrics(&e.scores), "wrong_photos": metrics(&e.wrong_photos),
                "failed": e.failed.len(),
                "chair": e.chair.as_ref().map(|h| json!({
                    "truth": h.own.truth, "unannotated": h.unannotated,
                    "chair_i": h.own.chair_i, "chair_s": h.own.chair_s,
                    "mentions": h.own.mentions,
                    "wrong_photos": {"chair_i": h.wrong_photos.chair_i, "chair_s": h.wrong_photos.chair_s},
                })),
                "heads_retrieval": heads.as_ref().map(|h| h.to_pairs().into_iter().collect::<std::collections::BTreeMap<_, _>>()),
            }))?
        );
    } else {
        println!("{} — {} images ({})", set.name, e.images, e.lang);
        println!(
            "{:<16} {:>8} {:>7} {:>7} {:>7} {:>7} {:>8}",
            "", "CIDEr-D", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L"
        );
        for (name, s) in [("own photos", &e.scores), ("wrong photos", &e.wrong_photos)] {
            println!(
                "{name:<16} {:>8.3} {:>7.3} {:>7.3} {:>7.3} {:>7.3} {:>8.3}",
                s.cider_d, s.bleu[0], s.bleu[1], s.bleu[2], s.bleu[3], s.rouge_l
            );
        }
        if let Some(h) = &e.chair {
            println!(
                "CHAIR_i {:.3} / CHAIR_s {:.3} over {} object mentions (wrong photos: {:.3} / {:.3}); objects from {}",
                h.own.chair_i,
                h.own.chair_s,
                h.own.mentions,
                h.wrong_photos.chair_i,
                h.wrong_photos.chair_s,
                h.own.truth.describe()
            );
        }
        if let Some(h) = &heads {
            println!(
                "contrastive heads: mean recall {:.4} (text→image R@1 {:.4}, image→text R@1 {:.4})",
                h.mean_recall, h.image_retrieval_recall[0].1, h.text_retrieval_recall[0].1
            );
        }
    }
    for (p, err) in &e.failed {
        eprintln!("error: {p}: {err}");
    }
    Ok(if e.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
