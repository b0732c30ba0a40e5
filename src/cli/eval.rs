//! `clasp eval retrieval|zeroshot|diagnose|caption|pope`.

use super::note;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Map, Value};

use super::{device, BarProgress};
use clasp::data::{self, DataIssue, DatasetSpec, Lang, Split};
use clasp::eval::{self, diagnose, report, EmbedContext, EmbeddingCache, RECALL_KS};
use clasp::model::ModelConfig;
use clasp::preprocess::prompts;
use clasp::Encoder;

#[path = "eval/blip2.rs"]
mod blip2;
#[path = "eval/caption.rs"]
mod caption;
#[path = "eval/frechet.rs"]
mod frechet;
#[path = "eval/pope.rs"]
mod pope;
mod vq;
#[path = "eval/zeroshot.rs"]
mod zeroshot;

pub use caption::*;
pub use frechet::*;
pub use pope::*;
pub use vq::*;

#[derive(Subcommand, Debug)]
pub enum EvalCommand {
    /// Image↔text Recall@K, median rank and mAP, as CLIP_benchmark computes them.
    Retrieval(RetrievalArgs),
    /// Zero-shot classification accuracy with prompt ensembling.
    Zeroshot(ZeroshotArgs),
    /// Modality gap, per-modality spread, positive/negative similarity, near-synonym probe.
    Diagnose(DiagnoseArgs),
    /// Caption a dataset's images with a vision-language model and score BLEU-1..4,
    /// ROUGE-L and CIDEr-D as pycocoevalcap does (Chinese on characters).
    Caption(CaptionArgs),
    /// Object hallucination probes (POPE): yes/no questions about objects an image holds
    /// and objects it lacks (random, popular, adversarial); accuracy, precision, recall, F1.
    Pope(PopeArgs),
    /// A VQ image tokenizer's reconstructions: PSNR, SSIM, codebook use and a perceptual
    /// score, beside the wrong photo and a same-size thumbnail, with a picture grid.
    Vq(VqArgs),
    /// The Fréchet distance between two image sets on a pretrained CNN's pooled features
    /// (FID's formula on the tower given; not FID).
    Frechet(FrechetArgs),
}

#[derive(Args, Debug)]
pub struct Common {
    /// Model: a local directory or a Hugging Face Hub id.
    #[arg(long, short)]
    pub model: String,
    /// Images or texts per model batch.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    #[command(flatten)]
    pub compute: super::ComputeArgs,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Write report.md and PNG plots into this directory.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Embedding cache file [default: $CLASP_CACHE_DIR or the platform cache dir].
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Embed everything afresh and store nothing.
    #[arg(long)]
    pub no_cache: bool,
    #[command(flatten)]
    pub resolution: super::ResolutionArgs,
}

#[derive(Args, Debug)]
pub struct PairArgs {
    /// Dataset: FORMAT:PATH or PATH. Formats: flickr8k, karpathy, coco, cnclip,
    /// csv|tsv|jsonl (columns image/filepath and caption/text).
    #[arg(long, short)]
    pub dataset: String,
    /// Split to read (flickr8k, karpathy, cnclip); single-split formats ignore it.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Caption language [default: zh for Chinese-CLIP models, else en].
    #[arg(long)]
    pub lang: Option<String>,
    /// Where image paths in the dataset are relative to, when not the usual place.
    #[arg(long)]
    pub image_root: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct RetrievalArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub pairs: PairArgs,
    /// Also re-rank each caption's top K photos and each photo's top K captions with a fusion
    /// model's ITM head (--rerank-model): `itm[:K]` or `itm+sim[:K]` [K: 32]; the JSON gains
    /// `reranked` (its recall) beside the first stage's.
    #[arg(long)]
    pub rerank: Option<clasp::model::blip2::Rerank>,
    /// The fusion model for --rerank: a Blip2ForImageTextRetrieval folder [default: --model,
    /// when it is one].
    #[arg(long, requires = "rerank")]
    pub rerank_model: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ZeroshotArgs {
    #[command(flatten)]
    pub common: Common,
    /// A folder per class: DIR/<class>/<images>.
    #[arg(long, short)]
    pub dataset: PathBuf,
    /// Class names for prompts, one per line in sorted folder order, or
    /// `folder<TAB>name` lines [default: the folder names; CIFAR-10's Chinese
    /// names with --lang zh].
    #[arg(long)]
    pub classes: Option<PathBuf>,
    /// Prompt templates, one per line, with `{}` or `{c}` for the class
    /// [default: openai's 18 CIFAR templates, or Chinese ones with --lang zh].
    #[arg(long)]
    pub templates: Option<PathBuf>,
    /// Prompt language [default: zh for Chinese-CLIP models, else en].
    #[arg(long)]
    pub lang: Option<String>,
}

#[derive(Args, Debug)]
pub struct DiagnoseArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub pairs: PairArgs,
    /// Near-synonym pairs, `phrase A<TAB>phrase B` per line [default: built-in
    /// pairs in the caption language].
    #[arg(long)]
    pub synonyms: Option<PathBuf>,
}

pub fn run(cmd: EvalCommand) -> Result<ExitCode> {
    match cmd {
        EvalCommand::Retrieval(a) => retrieval(a),
        EvalCommand::Zeroshot(a) => zeroshot::zeroshot(a),
        EvalCommand::Diagnose(a) => diagnose_cmd(a),
        EvalCommand::Caption(a) => caption_cmd(a),
        EvalCommand::Pope(a) => pope_cmd(a),
        EvalCommand::Vq(a) => vq_cmd(a),
        EvalCommand::Frechet(a) => frechet_cmd(a),
    }
}

struct Loaded {
    encoder: Encoder,
    cache: Option<EmbeddingCache>,
    batch_size: usize,
}

impl Loaded {
    /// Where this command's embeddings come from and go.
    fn ctx<'a>(&'a mut self, progress: &'a BarProgress) -> EmbedContext<'a> {
        EmbedContext {
            encoder: &self.encoder,
            cache: self.cache.as_mut(),
            model_key: None,
            batch_size: self.batch_size,
            progress,
        }
    }
}

fn load(c: &Common) -> Result<Loaded> {
    let dev = device(c.compute.device)?;
    let encoder = super::load_encoder(
        &c.model,
        &dev,
        clasp::model::Towers::Both,
        c.compute.precision,
        &c.resolution,
    )?;
    let cache = if c.no_cache {
        None
    } else {
        let p = c.cache.clone().unwrap_or_else(EmbeddingCache::default_path);
        Some(EmbeddingCache::open(&p)?)
    };
    Ok(Loaded {
        encoder,
        cache,
        batch_size: c.batch_size,
    })
}

fn lang_for(arg: &Option<String>, enc: &Encoder) -> Result<Lang> {
    Ok(match arg {
        Some(l) => Lang::parse(l)?,
        None => match enc.config() {
            ModelConfig::ChineseClip(_) => Lang::Zh,
            ModelConfig::Clip(_) | ModelConfig::DualEncoder(_) | ModelConfig::Siglip(_) => Lang::En,
        },
    })
}

fn load_pairs(p: &PairArgs, lang: Lang) -> Result<(DatasetSpec, data::PairSet)> {
    let spec = DatasetSpec::parse(&p.dataset)?;
    let split = Split::parse(&p.split)?;
    let set = data::load_pairs(&spec, split, lang, p.image_root.as_deref())?;
    Ok((spec, set))
}

/// Lists data issues on stderr, with what they cost.
fn report_issues(issues: &[DataIssue], quiet_json: bool) {
    if issues.is_empty() {
        return;
    }
    let imgs: usize = issues.iter().map(|i| i.dropped_images).sum();
    let caps: usize = issues.iter().map(|i| i.dropped_captions).sum();
    eprintln!(
        "\n{} data issue(s); dropped {imgs} image(s) and {caps} caption(s):",
        issues.len()
    );
    let show = if quiet_json { 10 } else { 50 };
    for i in issues.iter().take(show) {
        eprintln!("  {i}");
    }
    if issues.len() > show {
        eprintln!("  … and {} more (see --report)", issues.len() - show);
    }
}

fn exit_for(issues: &[DataIssue]) -> ExitCode {
    let dropped: usize = issues
        .iter()
        .map(|i| i.dropped_images + i.dropped_captions)
        .sum();
    if dropped > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn print_json(obj: Map<String, Value>) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(&Value::Object(obj))?);
    Ok(())
}

fn retrieval(a: RetrievalArgs) -> Result<ExitCode> {
    if clasp::model::blip2::is_blip2_dir(Path::new(&a.common.model)) {
        return blip2::blip2_retrieval(a);
    }
    if a.rerank.is_some() && a.rerank_model.is_none() {
        bail!(
            "--rerank needs a fusion head: --rerank-model DIR (a Blip2ForImageTextRetrieval \
             folder); {} is a dual encoder",
            a.common.model
        );
    }
    let t0 = Instant::now();
    let mut l = load(&a.common)?;
    let lang = lang_for(&a.pairs.lang, &l.encoder)?;
    let (_, set) = load_pairs(&a.pairs, lang)?;
    let name = set.name.clone();
    let bar = BarProgress::default();
    let mut ctx = l.ctx(&bar);
    let r = eval::retrieval::evaluate_retrieval(&mut ctx, set, &RECALL_KS)?;
    let secs = t0.elapsed().as_secs_f64();
    let reranked = match (&a.rerank, &a.rerank_model) {
        (Some(how), Some(m)) => {
            let fusion = load_fusion(m, &a.common)?;
            let before = (&r.image_retrieval, &r.text_retrieval);
            Some(rerank_with(
                &fusion,
                &r.data.set,
                &r.scores,
                before,
                *how,
                &bar,
            )?)
        }
        _ => None,
    };
    let issues = &r.data.set.issues;
    if a.common.json {
        let mut o = Map::new();
        for (k, v) in r.metrics.to_pairs() {
            o.insert(k, json!(v));
        }
        if let Some(v) = &reranked {
            o.insert("reranked".into(), v.clone());
        }
        o.insert("n_images".into(), json!(r.data.images.len()));
        o.insert("n_texts".into(), json!(r.data.texts.len()));
        o.insert("dropped_images".into(), json!(r.data.set.dropped_images()));
        o.insert(
            "dropped_captions".into(),
            json!(r.data.set.dropped_captions()),
        );
        o.insert("data_issues".into(), json!(issues.len()));
        o.insert("image_cache_hits".into(), json!(r.data.cache_hits));
        o.insert("dataset".into(), json!(name));
        o.insert("model".into(), json!(a.common.model));
        o.insert("seconds".into(), json!(secs));
        print_json(o)?;
    } else {
        println!(
            "{name}: {} images, {} texts ({secs:.1} s)",
            r.data.images.len(),
            r.data.texts.len()
        );
        println!(
            "{:<16}{:>10}{:>10}{:>10}{:>12}{:>10}",
            "direction", "R@1", "R@5", "R@10", "median rank", "mAP"
        );
        // Percentages, marked as such (the JSON keeps fractions, as CLIP_benchmark).
        let pct = |v: f64| format!("{:.2}%", v * 100.0);
        let row = |label: &str, rec: &[(usize, f64)], med: f64, map: f64| {
            print!("{label:<16}");
            for (_, v) in rec {
                print!("{:>10}", pct(*v));
            }
            println!("{med:>12}{:>10}", pct(map));
        };
        let m = &r.metrics;
        row(
            "text→image",
            &m.image_retrieval_recall,
            m.image_retrieval_median_rank,
            m.image_retrieval_map,
        );
        row(
            "image→text",
            &m.text_retrieval_recall,
            m.text_retrieval_median_rank,
            m.text_retrieval_map,
        );
        println!("mean recall {}", pct(m.mean_recall));
        if let Some(v) = &reranked {
            println!(
                "re-ranked ({} candidates): text→image R@1 {}, image→text R@1 {}, mean recall {} ({:.1} ms a query)",
                v["candidates"],
                pct(v["image_retrieval_recall@1"].as_f64().unwrap_or(0.0)),
                pct(v["text_retrieval_recall@1"].as_f64().unwrap_or(0.0)),
                pct(v["mean_recall"].as_f64().unwrap_or(0.0)),
                v["ms_per_query"].as_f64().unwrap_or(0.0)
            );
        }
    }
    if let Some(dir) = &a.common.report {
        report::retrieval(dir, &a.common.model, &name, &r)?;
        note!("wrote {}", dir.join("report.md").display());
    }
    report_issues(issues, a.common.json);
    Ok(exit_for(issues))
}

/// The retrieval re-ranked by a fusion model: its metrics, candidates, ITM
/// passes and the added time per query (captions and photos both query).
fn load_fusion(model: &Path, common: &Common) -> Result<clasp::model::blip2::Blip2Retrieval> {
    if !clasp::model::blip2::is_blip2_dir(model) {
        bail!(
            "--rerank-model {}: not a fusion model (a Blip2ForImageTextRetrieval folder)",
            model.display()
        );
    }
    let dev = super::device(common.compute.device)?;
    clasp::model::blip2::Blip2Retrieval::load(model, &dev)
        .with_context(|| format!("--rerank-model {}", model.display()))
}

/// `scores` (texts × images of `set`, ranked `before`) re-ranked by
/// `fusion`: the new recall, the R@1 hits made and lost, the same passes
/// ordered by the other score, and the time it added.
fn rerank_with(
    fusion: &clasp::model::blip2::Blip2Retrieval,
    set: &data::PairSet,
    scores: &[f32],
    before: (
        &eval::metrics::DirectionRanks,
        &eval::metrics::DirectionRanks,
    ),
    how: clasp::model::blip2::Rerank,
    bar: &BarProgress,
) -> Result<serde_json::Value> {
    use eval::rerank::Reordered;
    let t0 = Instant::now();
    let re = eval::rerank::rerank(fusion, set, scores, how, bar)?;
    let secs = t0.elapsed().as_secs_f64();
    let order_json = |r: Reordered| {
        let mut o = Map::new();
        for (k, v) in r.metrics.to_pairs() {
            o.insert(k, json!(v));
        }
        // Query by query: which R@1 hits re-ranking made and which it lost.
        for (dir, (fixed, broken)) in ["t2i", "i2t"].into_iter().zip(r.r1_changes) {
            o.insert(format!("{dir}_r1_fixed"), json!(fixed));
            o.insert(format!("{dir}_r1_broken"), json!(broken));
        }
        o
    };
    let mut o = order_json(Reordered::read(&re.t2i, &re.i2t, set, before, &RECALL_KS));
    // The other score's order, from the same ITM passes.
    let mut other = order_json(Reordered::read(
        &re.other_t2i,
        &re.other_i2t,
        set,
        before,
        &RECALL_KS,
    ));
    other.insert(
        "score".into(),
        json!(match re.other {
            clasp::model::blip2::RerankScore::Itm => "itm",
            clasp::model::blip2::RerankScore::ItmPlusSim => "itm+sim",
        }),
    );
    o.insert("other_score".into(), Value::Object(other));
    o.insert("candidates".into(), json!(how.candidates));
    o.insert("pairs_scored".into(), json!(re.pairs_scored));
    o.insert("seconds".into(), json!(secs));
    let n = scores.len() / set.captions.len().max(1);
    let queries = (set.captions.len() + n).max(1) as f64;
    o.insert("ms_per_query".into(), json!(1000.0 * secs / queries));
    Ok(serde_json::Value::Object(o))
}

fn read_lines(p: &Path) -> Result<Vec<String>> {
    let body = std::fs::read_to_string(p).with_context(|| format!("{}", p.display()))?;
    Ok(body
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect())
}

fn diagnose_cmd(a: DiagnoseArgs) -> Result<ExitCode> {
    let mut l = load(&a.common)?;
    let lang = lang_for(&a.pairs.lang, &l.encoder)?;
    let (_, set) = load_pairs(&a.pairs, lang)?;
    let name = set.name.clone();
    let synonyms = match &a.synonyms {
        Some(p) => {
            let mut out = Vec::new();
            for (n, line) in read_lines(p)?.into_iter().enumerate() {
                match line.split_once('\t') {
                    Some((x, y)) => out.push((x.trim().to_string(), y.trim().to_string())),
                    None => bail!(
                        "{}:{}: expected `phrase A<TAB>phrase B`",
                        p.display(),
                        n + 1
                    ),
                }
            }
            out
        }
        None => diagnose::builtin_synonyms(lang),
    };
    let bar = BarProgress::default();
    let mut ctx = l.ctx(&bar);
    let data = eval::retrieval::embed_pairs(&mut ctx, set)?;
    let d = diagnose::diagnose(&mut ctx, &data, &synonyms)?;
    if a.common.json {
        println!("{}", serde_json::to_string_pretty(&d)?);
    } else {
        println!("{name}: {} images, {} texts", d.n_images, d.n_texts);
        println!(
            "modality gap ‖μ_img − μ_txt‖   {:.4}   (centroid cosine {:.4})",
            d.modality_gap, d.centroid_cosine
        );
        println!(
            "mean pairwise cosine: images {:.4}, texts {:.4}",
            d.image_mean_pairwise_cosine, d.text_mean_pairwise_cosine
        );
        println!(
            "pair similarity: positive {:.4} ± {:.4}, negative {:.4} ± {:.4}, AUC {:.4}",
            d.positive_mean,
            d.positive_std,
            d.negative_mean,
            d.negative_std,
            d.positive_over_negative_auc
        );
        if !d.synonyms.is_empty() {
            println!(
                "near-synonym probe (text distance vs distance of the images each retrieves):"
            );
            for s in &d.synonyms {
                println!(
                    "  {} / {}: text {:.4}, images {:.4} ({} vs {}), top-5 overlap {}/5",
                    s.a,
                    s.b,
                    s.text_distance,
                    s.image_distance,
                    s.image_a,
                    s.image_b,
                    s.top5_overlap
                );
            }
        }
    }
    if let Some(dir) = &a.common.report {
        report::diagnostics(dir, &a.common.model, &name, &d, &data.set.issues)?;
        note!("wrote {}", dir.join("report.md").display());
    }
    report_issues(&data.set.issues, a.common.json);
    Ok(exit_for(&data.set.issues))
}
