//! `clasp eval vq`: a VQ image tokenizer's reconstructions of a dataset's
//! photos (PSNR, SSIM, codebook use, a perceptual score) beside controls,
//! with a picture grid.

use super::super::native::open;
use super::*;
use clasp::eval::vq::{self, Perceptual};

#[derive(Args, Debug)]
pub struct VqArgs {
    /// A VQ tokenizer folder (Emu3VQVAE) or a native model holding one.
    #[arg(long, short)]
    pub model: PathBuf,
    /// Dataset: FORMAT:PATH or PATH.
    #[arg(long, short)]
    pub dataset: String,
    #[arg(long, default_value = "dev")]
    pub split: String,
    /// Only the first N photos.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Another tokenizer scored on the same photos (e.g. the run's untrained start,
    /// RUN/init), with the paired t of PSNR against it.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// A pretrained CNN file (MobileNetV2's .pth) whose pooled features give the perceptual
    /// score: the cosine between the photo's and the reconstruction's.
    #[arg(long)]
    pub perceptual: Option<PathBuf>,
    /// Write report.json, per_image.jsonl and grid.png (photos over reconstructions) here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub(super) fn vq_cmd(a: VqArgs) -> Result<ExitCode> {
    let (model, cfg) = open(&a.model)?;
    let baseline = a.baseline.as_deref().map(open).transpose()?;
    let perceptual = a.perceptual.as_deref().map(Perceptual::load).transpose()?;
    let spec = DatasetSpec::parse(&a.dataset)?;
    let set = data::load_pairs(&spec, Split::parse(&a.split)?, Lang::En, None)?;
    report_issues(&set.issues, a.json);
    let n = a.limit.unwrap_or(set.images.len()).min(set.images.len());
    let mut photos = Vec::new();
    for src in &set.images[..n] {
        let path = src.path();
        match src
            .read()
            .and_then(|b| clasp::preprocess::image::decode_image(&b, &path))
        {
            Ok(img) => photos.push((path.display().to_string(), img)),
            Err(e) => eprintln!("error: {e}"),
        }
    }
    if photos.len() < 2 {
        bail!(
            "{}: fewer than 2 readable photos (the wrong-photo control needs two)",
            a.dataset
        );
    }
    let bar = super::super::progress_bar(photos.len() as u64, "photos");
    let mut counts = vec![0f64; model.config().codebook_size];
    let (scores, recs) = vq::score_photos(
        &model,
        &cfg,
        baseline.as_ref().map(|(m, c)| (m, c)),
        perceptual.as_ref(),
        &photos,
        &mut counts,
        &|i| bar.set_position(i as u64 + 1),
    )?;
    bar.finish_and_clear();
    let (perplexity, used) = clasp::model::emu3_vq::codebook_usage(&counts);
    let summary = vq::summarize(&scores);
    let out = json!({
        "model": a.model.display().to_string(),
        "photos": scores.len(),
        "codebook": {"size": counts.len(), "used": used, "perplexity": perplexity},
        "scores": summary,
    });
    if let Some(dir) = &a.report {
        std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
        std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(&out)?)?;
        let rows: Vec<String> = scores
            .iter()
            .map(serde_json::to_string)
            .collect::<std::result::Result<_, _>>()?;
        std::fs::write(dir.join("per_image.jsonl"), rows.join("\n") + "\n")?;
        let pairs: Vec<_> = recs
            .iter()
            .take(8)
            .map(|r| (&r.original, &r.recon))
            .collect();
        vq::grid(&pairs, 8).save(dir.join("grid.png"))?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "{} photos; codebook: {used} of {} codes used, perplexity {perplexity:.1}",
            scores.len(),
            counts.len()
        );
        for (metric, m) in summary.as_object().expect("an object") {
            for (k, v) in m.as_object().expect("an object") {
                let t = v["reconstruction_minus_this"]["paired_t"].as_f64();
                println!(
                    "{metric:>10} {k:<15} {:>8.4}{}",
                    v["mean"].as_f64().unwrap_or(f64::NAN),
                    t.map(|t| format!("   (reconstruction − this: paired t {t:.2})"))
                        .unwrap_or_default()
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
