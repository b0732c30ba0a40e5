//! `clasp caption` (images and, for a LLaVA-NeXT-Video model, videos; best-of-n
//! with a reward model) and `clasp score`: front ends over `clasp::vlm`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Args;
use clasp::data::ImageSource;

use super::vlm::{load, user_turn, video_turn, LangArg, SampleArgs};
use super::BarProgress;

/// Caption images with a vision-language model.
#[derive(Args, Debug)]
pub struct CaptionArgs {
    /// A VLM checkpoint folder (LlavaForConditionalGeneration layout).
    #[arg(short, long)]
    pub model: PathBuf,
    /// Image files.
    pub images: Vec<PathBuf>,
    /// A folder of images, or a list file with one path per line.
    #[arg(long, value_name = "DIR_OR_LIST")]
    pub images_from: Option<PathBuf>,
    /// The instruction's language: "Describe the image." or its Chinese.
    #[arg(long, value_enum, default_value_t = LangArg::En)]
    pub lang: LangArg,
    /// The user turn instead of the default; `<image>` marks the image (put first when absent).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Images captioned together.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Frames sampled from each video (mp4, mkv, mov, webm, avi, m4v) among the inputs, for a
    /// LLaVA-NeXT-Video model (the centres of equal spans).
    #[arg(long, default_value_t = 8)]
    pub frames: usize,
    #[command(flatten)]
    pub sample: SampleArgs,
    /// Sample N captions per image and keep the one --reward-model rates highest (needs
    /// --temperature above 0; --json lists every candidate with its reward).
    #[arg(long, default_value_t = 1, requires = "reward_model")]
    pub best_of: usize,
    /// A vision-language reward model (`clasp train --task reward --init VLM`) for --best-of.
    #[arg(long)]
    pub reward_model: Option<PathBuf>,
    /// Print [{"path", "caption"}] as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn caption_cmd(a: CaptionArgs) -> Result<ExitCode> {
    let mut paths = a.images.clone();
    if let Some(src) = &a.images_from {
        paths.extend(clasp::encoder::image_inputs_from(src)?);
    }
    if paths.is_empty() {
        bail!("give image files, or --images-from DIR_OR_LIST");
    }
    let results: Vec<clasp::Result<clasp::llm::Generation>> = if clasp::vlm::native::is_native(
        &a.model,
    ) {
        if a.reward_model.is_some() {
            bail!("--reward-model: best-of-n reranking takes a bridge (Llava) model, not a native one");
        }
        let m = clasp::vlm::native::NativeModel::load(&a.model, &candle_core::Device::Cpu)?;
        let (user, opts) = (user_turn(a.prompt.as_deref(), a.lang), a.sample.options()?);
        paths.iter().map(|p| m.caption(p, &user, &opts)).collect()
    } else {
        let vlm = load(&a.model)?;
        let sources: Vec<ImageSource> = paths.iter().cloned().map(ImageSource::File).collect();
        let bar = BarProgress::default();
        if let Some(rm) = &a.reward_model {
            return best_of_cmd(&a, &vlm, rm, &paths, &sources, &bar);
        }
        // Videos (a LLaVA-NeXT-Video model's) and images, each answered
        // their way, the results back in the given order.
        let (videos, images): (Vec<usize>, Vec<usize>) =
            (0..paths.len()).partition(|&i| clasp::video::is_video(&paths[i]));
        let opts = a.sample.options()?;
        let mut results: Vec<Option<clasp::Result<clasp::llm::Generation>>> =
            (0..paths.len()).map(|_| None).collect();
        if !images.is_empty() {
            let srcs: Vec<ImageSource> = images.iter().map(|&i| sources[i].clone()).collect();
            let user = user_turn(a.prompt.as_deref(), a.lang);
            let got =
                clasp::vlm::caption::caption_images(&vlm, &srcs, &user, &opts, a.batch_size, &bar)?;
            for (&i, r) in images.iter().zip(got) {
                results[i] = Some(r);
            }
        }
        if !videos.is_empty() {
            let user = video_turn(a.prompt.as_deref(), a.lang);
            let clips: Vec<PathBuf> = videos.iter().map(|&i| paths[i].clone()).collect();
            let got =
                clasp::vlm::caption::caption_videos(&vlm, &clips, &user, &opts, a.frames, &bar)?;
            for (&i, r) in videos.iter().zip(got) {
                results[i] = Some(r);
            }
        }
        results
            .into_iter()
            .map(|r| r.expect("every path is an image or a video"))
            .collect()
    };
    let mut failed = 0;
    let mut rows = Vec::new();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for (p, r) in paths.iter().zip(results) {
        match r {
            Ok(g) => {
                if a.json {
                    rows.push(
                        serde_json::json!({"path": p.display().to_string(), "caption": g.text}),
                    );
                } else {
                    writeln!(out, "{}\t{}", p.display(), g.text.replace('\n', " "))?;
                }
            }
            Err(e) => {
                failed += 1;
                eprintln!("error: {e}");
            }
        }
    }
    if a.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
    }
    if failed > 0 {
        eprintln!("{failed} of {} images could not be captioned", paths.len());
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// `clasp caption --best-of N --reward-model RM`.
fn best_of_cmd(
    a: &CaptionArgs,
    vlm: &clasp::vlm::Vlm,
    rm: &std::path::Path,
    paths: &[PathBuf],
    sources: &[ImageSource],
    bar: &BarProgress,
) -> Result<ExitCode> {
    if a.best_of > 1 && a.sample.temperature <= 0.0 {
        bail!(
            "--best-of {} draws different captions only with --temperature above 0",
            a.best_of
        );
    }
    let rm = clasp::vlm::reward::VlmReward::load(rm, vlm.device())?;
    let user = user_turn(a.prompt.as_deref(), a.lang);
    let results = clasp::vlm::reward::best_of(
        vlm,
        &rm,
        sources,
        &user,
        &a.sample.options()?,
        a.best_of.max(1),
        a.batch_size,
        bar,
    )?;
    let (mut rows, mut failed) = (Vec::new(), 0);
    for (p, r) in paths.iter().zip(results) {
        match r {
            Ok(b) => {
                let best = &b.candidates[b.best].0;
                if a.json {
                    let cands: Vec<_> = b
                        .candidates
                        .iter()
                        .map(|(c, r)| serde_json::json!({"caption": c, "reward": r}))
                        .collect();
                    rows.push(serde_json::json!({"path": p.display().to_string(),
                        "caption": best, "candidates": cands}));
                } else {
                    println!("{}\t{}", p.display(), best.replace('\n', " "));
                }
            }
            Err(e) => {
                failed += 1;
                eprintln!("error: {e}");
            }
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    }
    Ok(if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Rate answers about an image with a vision-language reward model.
#[derive(Args, Debug)]
pub struct ScoreArgs {
    /// A reward model (`clasp train --task reward --init VLM`).
    #[arg(short, long)]
    pub model: PathBuf,
    #[arg(long)]
    pub image: PathBuf,
    /// An answer to rate (repeatable).
    #[arg(long, required = true)]
    pub answer: Vec<String>,
    /// The user turn the answers reply to [default: "Describe the image."].
    #[arg(short, long)]
    pub prompt: Option<String>,
}

pub fn score_cmd(a: ScoreArgs) -> Result<ExitCode> {
    let rm = clasp::vlm::reward::VlmReward::load(&a.model, &candle_core::Device::Cpu)?;
    let px = rm.vlm.pixels(&[a.image.as_path()])?;
    let user = user_turn(a.prompt.as_deref(), LangArg::En);
    let r = rm.scores(&px, &user, &a.answer)?;
    let rows: Vec<_> = a
        .answer
        .iter()
        .zip(r)
        .map(|(t, r)| serde_json::json!({"answer": t, "reward": r}))
        .collect();
    println!("{}", serde_json::to_string_pretty(&rows)?);
    Ok(ExitCode::SUCCESS)
}
