//! `clasp embed`.

use super::note;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::output::{check_output, write_embeddings, Embedded};
use super::{device, progress_bar};
use clasp::Encoder;

#[derive(Args, Debug)]
pub struct EmbedArgs {
    /// Model: a local directory (config.json, model.safetensors, tokenizer,
    /// preprocessor_config.json) or a Hugging Face Hub id.
    #[arg(long, short)]
    pub model: String,
    /// An image file to embed (repeatable).
    #[arg(long = "image")]
    pub images: Vec<PathBuf>,
    /// A directory of images, or a text file with one image path per line.
    #[arg(long)]
    pub images_from: Option<PathBuf>,
    /// A text to embed (repeatable).
    #[arg(long = "text")]
    pub texts: Vec<String>,
    /// A file with one text per line.
    #[arg(long)]
    pub texts_from: Option<PathBuf>,
    /// Images or texts per model batch.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Video files (repeatable; FFmpeg reads them): each frame sampled is embedded as an image,
    /// and their mean (CLIP4Clip's mean pooling). Written as JSON lines, one per video: its
    /// `mean` and its `frames` with their `time` in seconds.
    #[arg(long = "video", conflicts_with_all = ["images", "images_from", "texts", "texts_from", "similarity"])]
    pub videos: Vec<PathBuf>,
    /// Frames per video, at the centres of equal spans.
    #[arg(long, default_value_t = 8)]
    pub frames: usize,
    /// Sample one frame every 1/F seconds instead of --frames.
    #[arg(long)]
    pub video_fps: Option<f64>,
    #[command(flatten)]
    pub compute: super::ComputeArgs,
    /// Where to write: FILE.npy (writes FILE.image.npy and FILE.text.npy),
    /// FILE.jsonl or FILE.safetensors. Without it, JSON lines go to stdout.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Print logits_per_image (images x texts) as the model computes it, and for SigLIP each
    /// pair's sigmoid probability.
    #[arg(long)]
    pub similarity: bool,
    #[command(flatten)]
    pub resolution: super::ResolutionArgs,
    #[command(flatten)]
    pub bulk: bulk::BulkArgs,
}

#[path = "embed_bulk.rs"]
mod bulk;

/// The model of `a`, both towers, on its device and precision.
fn encoder_for(a: &EmbedArgs) -> Result<Encoder> {
    let dev = device(a.compute.device)?;
    super::load_encoder(
        &a.model,
        &dev,
        clasp::model::Towers::Both,
        a.compute.precision,
        &a.resolution,
    )
}

pub fn run(a: EmbedArgs) -> Result<ExitCode> {
    if a.bulk.dataset.is_some() {
        return bulk::run(&a);
    }
    let mut image_paths = a.images.clone();
    if let Some(src) = &a.images_from {
        image_paths.extend(clasp::encoder::image_inputs_from(src)?);
    }
    let mut texts = a.texts.clone();
    if let Some(f) = &a.texts_from {
        let body = std::fs::read_to_string(f).with_context(|| format!("{}", f.display()))?;
        texts.extend(body.lines().map(str::to_string));
    }
    if !a.videos.is_empty() {
        return videos(&a);
    }
    if image_paths.is_empty() && texts.is_empty() {
        bail!("nothing to embed: give --image, --images-from, --text, --texts-from or --video");
    }
    if a.similarity && (image_paths.is_empty() || texts.is_empty()) {
        bail!("--similarity needs both images and texts");
    }
    // A bad output path is found before the work, not after it.
    if let Some(p) = &a.output {
        check_output(p)?;
    }
    let encoder = encoder_for(&a)?;
    tracing::info!(model = %a.model, kind = encoder.config().model_type(), "loaded");

    let mut out = Embedded::default();
    let mut failures = Vec::new();
    if !image_paths.is_empty() {
        let pb = progress_bar(image_paths.len() as u64, "images");
        let r = encoder.embed_image_files(&image_paths, a.batch_size, |n| pb.inc(n as u64))?;
        pb.finish_and_clear();
        out.image_inputs = r
            .indices
            .iter()
            .map(|&i| image_paths[i].display().to_string())
            .collect();
        out.images = r.embeddings;
        failures = r.failures;
    }
    if !texts.is_empty() {
        let pb = progress_bar(texts.len() as u64, "texts");
        out.texts = encoder.embed_text_batches(&texts, a.batch_size, |n| pb.inc(n as u64))?;
        pb.finish_and_clear();
        out.text_inputs = texts;
    }
    out.dim = encoder.embedding_dim();
    out.model = a.model.clone();

    if a.similarity {
        print_similarity(&encoder, &out)?;
    }
    match &a.output {
        Some(path) => {
            for p in write_embeddings(path, &out)? {
                note!("wrote {}", p.display());
            }
        }
        None if !a.similarity => write_embeddings(std::path::Path::new("-"), &out).map(|_| ())?,
        None => {}
    }

    if failures.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!(
        "\n{} of {} images failed:",
        failures.len(),
        image_paths.len()
    );
    for f in &failures {
        eprintln!("  {}", f.error);
    }
    Ok(ExitCode::from(1))
}

fn print_similarity(encoder: &Encoder, out: &Embedded) -> Result<()> {
    let dev = encoder.device();
    let flat = |rows: &[Vec<f32>]| rows.iter().flatten().copied().collect::<Vec<f32>>();
    let img = candle_core::Tensor::from_vec(flat(&out.images), (out.images.len(), out.dim), dev)?;
    let txt = candle_core::Tensor::from_vec(flat(&out.texts), (out.texts.len(), out.dim), dev)?;
    let logits = encoder.similarity(&img, &txt)?.to_vec2::<f32>()?;
    println!("logits_per_image (rows: images, columns: texts)");
    for (j, t) in out.text_inputs.iter().enumerate() {
        println!("  t{j}: {t}");
    }
    print!("{:<40}", "");
    for j in 0..out.texts.len() {
        print!("{:>10}", format!("t{j}"));
    }
    println!();
    for (i, row) in logits.iter().enumerate() {
        let name = &out.image_inputs[i];
        let len = name.chars().count();
        let short: String = if len > 38 {
            format!("…{}", name.chars().skip(len - 37).collect::<String>())
        } else {
            name.clone()
        };
        print!("{short:<40}");
        for v in row {
            print!("{v:>10.4}");
        }
        println!();
    }
    if encoder.sigmoid_scores() {
        println!("probabilities (sigmoid of each logit: SigLIP scores every pair on its own)");
        for (i, row) in logits.iter().enumerate() {
            let r: Vec<f64> = row.iter().map(|&v| v as f64).collect();
            print!("{:<40}", format!("i{i}"));
            for p in encoder.probabilities(&r) {
                print!("{p:>10.4}");
            }
            println!();
        }
    }
    Ok(())
}

/// `clasp embed --video`: one JSON line per video; a video that cannot be
/// read is reported by name and the rest are embedded.
fn videos(a: &EmbedArgs) -> Result<ExitCode> {
    use clasp::video::Sampling;
    if let Some(p) = &a.output {
        check_output(p)?;
    }
    let sampling = match a.video_fps {
        Some(f) if f > 0.0 => Sampling::Fps(f),
        Some(f) => bail!("--video-fps must be above 0, not {f}"),
        None if a.frames > 0 => Sampling::Count(a.frames),
        None => bail!("--frames must be at least 1"),
    };
    let encoder = encoder_for(a)?;
    let pb = progress_bar(a.videos.len() as u64, "videos");
    let (mut lines, mut failed) = (String::new(), 0);
    for v in &a.videos {
        match encoder.embed_video(v, sampling, a.batch_size) {
            Ok(e) => {
                let frames: Vec<_> = e
                    .times
                    .iter()
                    .zip(&e.frames)
                    .map(|(t, f)| serde_json::json!({"time": t, "embedding": f}))
                    .collect();
                let row = serde_json::json!({
                    "video": v.display().to_string(), "duration": e.info.duration,
                    "width": e.info.width, "height": e.info.height, "fps": e.info.fps,
                    "mean": e.mean, "frames": frames,
                });
                lines.push_str(&row.to_string());
                lines.push('\n');
            }
            Err(e) => {
                failed += 1;
                eprintln!("error: {e}");
            }
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    match &a.output {
        Some(p) => {
            clasp::atomic::write_bytes(p, lines.as_bytes())?;
            note!("wrote {}", p.display());
        }
        None => print!("{lines}"),
    }
    Ok(if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
