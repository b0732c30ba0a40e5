//! `clasp eval pope`: POPE's yes/no object probes ("Is there a dog in the image?") asked of a vision-language model.

use super::*;
use clasp::eval::pope::{self, Negatives};

#[derive(Args, Debug)]
pub struct PopeArgs {
    /// A VLM checkpoint folder (LlavaForConditionalGeneration layout).
    #[arg(long, short)]
    pub model: PathBuf,
    /// Dataset: FORMAT:PATH or PATH (a COCO captions file finds its instances beside it).
    #[arg(long, short)]
    pub dataset: String,
    #[arg(long, default_value = "test")]
    pub split: String,
    /// COCO instance annotations for the images' objects [default: instances_*.json beside a
    /// COCO captions file; without one, the objects the references mention].
    #[arg(long)]
    pub instances: Option<PathBuf>,
    /// Negative sampling: random, popular, adversarial (comma-separated).
    #[arg(long, default_value = "random,popular,adversarial")]
    pub negatives: String,
    /// Objects asked per image (and as many absent ones); images with fewer are skipped.
    #[arg(long, default_value_t = 3)]
    pub per_image: usize,
    /// Poll only the first N images.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Seed of the random negatives.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// How answers are read: generate (POPE's way) or logits (the next token's "Yes" against
    /// "No", for models never taught to answer yes/no).
    #[arg(long, default_value = "generate")]
    pub answer_by: String,
    /// Tokens generated per answer at most.
    #[arg(long, default_value_t = 16)]
    pub max_tokens: usize,
    /// Print one JSON object (with every question and answer) instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub(super) fn pope_cmd(a: PopeArgs) -> Result<ExitCode> {
    let modes = a
        .negatives
        .split(',')
        .map(|m| {
            Negatives::ALL
                .into_iter()
                .find(|n| n.name() == m.trim())
                .with_context(|| {
                    format!("--negatives: unknown mode {m:?} (random, popular, adversarial)")
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let by = match a.answer_by.as_str() {
        "generate" => pope::AnswerBy::Generate,
        "logits" => pope::AnswerBy::Logits,
        o => bail!("--answer-by: {o:?} is neither generate nor logits"),
    };
    if a.per_image == 0 {
        bail!("--per-image must be at least 1");
    }
    let spec = DatasetSpec::parse(&a.dataset)?;
    let set = data::load_pairs(&spec, Split::parse(&a.split)?, Lang::En, None)?;
    report_issues(&set.issues, a.json);
    let n = a.limit.unwrap_or(set.images.len()).min(set.images.len());
    let instances_path = a
        .instances
        .clone()
        .or_else(|| clasp::data::objects::instances_beside(&spec.path));
    let objects: Vec<Vec<String>> = match &instances_path {
        Some(p) => {
            let inst = clasp::eval::chair::coco_instances(p)?;
            set.images[..n]
                .iter()
                .map(|src| {
                    let name = src
                        .path()
                        .file_name()
                        .map(|f| f.to_string_lossy().to_string());
                    name.and_then(|f| inst.get(&f))
                        .map(|o| o.iter().cloned().collect())
                        .unwrap_or_default()
                })
                .collect()
        }
        None => {
            let words = clasp::eval::chair::ObjectWords::coco();
            set.references()
                .into_iter()
                .take(n)
                .map(|r| words.objects_of(r).into_iter().collect())
                .collect()
        }
    };
    let vlm = clasp::vlm::Vlm::load(&a.model, &candle_core::Device::Cpu)?;
    let opts = clasp::llm::GenerateOptions {
        max_new_tokens: a.max_tokens,
        ..Default::default()
    };
    let t0 = Instant::now();
    let e = pope::evaluate_pope(
        &vlm,
        &set.images[..n],
        &objects,
        &modes,
        a.per_image,
        a.seed,
        &opts,
        by,
        &BarProgress::default(),
    )?;
    let secs = t0.elapsed().as_secs_f64();
    if e.runs.iter().all(|r| r.scores.questions == 0) {
        bail!(
            "no image of {} has {} objects to ask about (objects from {})",
            set.name,
            a.per_image,
            instances_path
                .as_ref()
                .map_or("the references".to_string(), |p| p.display().to_string())
        );
    }
    let source = instances_path
        .as_ref()
        .map_or("references".to_string(), |p| p.display().to_string());
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "model": a.model.display().to_string(), "dataset": set.name, "objects_from": source,
                "images": e.images, "seconds": secs, "runs": e.runs, "failed": e.failed,
            }))?
        );
    } else {
        println!(
            "{} — {} images polled, objects from {source}",
            set.name, e.images
        );
        println!(
            "{:<12} {:>9} {:>8} {:>9} {:>7} {:>7} {:>9}",
            "negatives", "questions", "accuracy", "precision", "recall", "F1", "yes-ratio"
        );
        for r in &e.runs {
            let s = &r.scores;
            println!(
                "{:<12} {:>9} {:>8.3} {:>9.3} {:>7.3} {:>7.3} {:>9.3}",
                r.negatives.name(),
                s.questions,
                s.accuracy,
                s.precision,
                s.recall,
                s.f1,
                s.yes_ratio
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
