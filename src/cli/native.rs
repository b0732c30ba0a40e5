//! `clasp tokenize-image` and `clasp detokenize-image`: a VQ image
//! tokenizer's codes of images, and images drawn back from codes.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::Args;
use clasp::model::emu3_vq::{pixels_to_image, Emu3Vq};
use clasp::preprocess::image::{ImageProcessor, ImageProcessorConfig};

#[derive(Args, Debug)]
pub struct TokenizeArgs {
    /// A VQ tokenizer folder (Emu3VQVAE) or a native model (Emu3) holding one.
    #[arg(long, short)]
    pub model: PathBuf,
    /// Images to tokenize.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

#[derive(Args, Debug)]
pub struct DetokenizeArgs {
    /// A VQ tokenizer folder (Emu3VQVAE) or a native model (Emu3) holding one.
    #[arg(long, short)]
    pub model: PathBuf,
    /// JSON lines with `codes` ([rows][columns]), as `clasp tokenize-image`
    /// prints them; `-` reads standard input.
    #[arg(long, default_value = "-")]
    pub codes: String,
    /// The PNG to write (one line of codes), or a folder for several
    /// (`0.png`, `1.png`, ...).
    #[arg(long, short)]
    pub output: PathBuf,
}

/// A VQ tokenizer (alone or a native model's) and its processor.
pub(super) fn open(model: &std::path::Path) -> Result<(Emu3Vq, ImageProcessorConfig)> {
    let vq = Emu3Vq::from_dir(model, &Device::Cpu)?;
    Ok((vq, clasp::model::emu3_vq::processor_config(model)?))
}

/// Prints one JSON line per image: its path, the processed size and the
/// codes. An image that cannot be read is named and the rest go on.
pub fn tokenize(a: TokenizeArgs) -> Result<ExitCode> {
    let (vq, cfg) = open(&a.model)?;
    let proc = ImageProcessor::new(cfg);
    let mut failed = 0;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for path in &a.images {
        let codes = proc.process_path_pixels(path).and_then(|px| {
            let t = Tensor::from_vec(px.data, (1, 3, px.height, px.width), &Device::Cpu)?;
            Ok((px.height, px.width, vq.encode(&t)?.squeeze(0)?))
        });
        match codes {
            Ok((h, w, c)) => {
                let codes: Vec<Vec<u32>> = c.to_dtype(candle_core::DType::U32)?.to_vec2()?;
                let line = serde_json::json!({
                    "image": path.display().to_string(), "height": h, "width": w, "codes": codes,
                });
                writeln!(out, "{line}")?;
            }
            Err(e) => {
                eprintln!("error: {e}");
                failed += 1;
            }
        }
    }
    Ok(if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Decodes each line's codes to a PNG.
pub fn detokenize(a: DetokenizeArgs) -> Result<ExitCode> {
    let (vq, cfg) = open(&a.model)?;
    let reader: Box<dyn BufRead> = if a.codes == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let f = std::fs::File::open(&a.codes).with_context(|| a.codes.clone())?;
        Box::new(std::io::BufReader::new(f))
    };
    let mut grids = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("{} line {}: not JSON", a.codes, n + 1))?;
        let codes: Vec<Vec<u32>> =
            serde_json::from_value(v["codes"].clone()).with_context(|| {
                format!(
                    "{} line {}: `codes` must be rows of code numbers",
                    a.codes,
                    n + 1
                )
            })?;
        let w = codes.first().map_or(0, Vec::len);
        if w == 0 || codes.iter().any(|r| r.len() != w) {
            bail!(
                "{} line {}: `codes` must be a non-empty grid of equal rows",
                a.codes,
                n + 1
            );
        }
        grids.push(codes);
    }
    if grids.is_empty() {
        bail!("{}: no codes", a.codes);
    }
    let several = grids.len() > 1;
    if several {
        std::fs::create_dir_all(&a.output).with_context(|| a.output.display().to_string())?;
    }
    for (i, codes) in grids.iter().enumerate() {
        let (h, w) = (codes.len(), codes[0].len());
        let flat: Vec<u32> = codes.iter().flatten().copied().collect();
        let t = Tensor::from_vec(flat, (1, h, w), &Device::Cpu)?;
        let px = vq.decode(&t)?.squeeze(0)?;
        let img = pixels_to_image(&px, &cfg)?;
        let path = if several {
            a.output.join(format!("{i}.png"))
        } else {
            a.output.clone()
        };
        img.save(&path)
            .with_context(|| path.display().to_string())?;
        eprintln!(
            "wrote {} ({}x{} pixels from {h}x{w} codes)",
            path.display(),
            img.width(),
            img.height()
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args, Debug)]
pub struct DrawArgs {
    /// What to draw.
    #[arg(required_unless_present = "prompts_from")]
    pub prompt: Option<String>,
    /// Draw one image for each line of this file (the line numbered from 1 uses seed + line −
    /// 1); --output is then a folder that receives LINE.png, and a JSON line per image goes to
    /// standard output. An empty line is reported and skipped.
    #[arg(long, value_name = "FILE", conflicts_with = "prompt")]
    pub prompts_from: Option<PathBuf>,
    /// A native model folder (Emu3ForConditionalGeneration, from `clasp assemble --native`).
    #[arg(long, short)]
    pub model: PathBuf,
    /// HEIGHTxWIDTH in pixels, multiples of the tokenizer's pixels per code [default: the
    /// square of the processor's smallest pixel budget].
    #[arg(long)]
    pub size: Option<String>,
    /// Classifier-free guidance scale (1: none).
    #[arg(long, default_value_t = 3.0)]
    pub cfg: f32,
    /// The unconditional branch's prompt (Emu3's by default).
    #[arg(long, default_value = clasp::vlm::native::NEGATIVE_PROMPT)]
    pub negative_prompt: String,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 2048)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The PNG to write (with --prompts-from: the folder).
    #[arg(long, short)]
    pub output: PathBuf,
}

/// `clasp draw`: an image sampled from a native model.
pub fn draw(a: DrawArgs) -> Result<ExitCode> {
    use clasp::vlm::native::{check_draw, default_draw_size, is_native, DrawOptions, NativeModel};
    if !is_native(&a.model) {
        bail!(
            "{}: not a native (Emu3) model; make one with `clasp assemble --native VQ_DIR --llm GGUF`",
            a.model.display()
        );
    }
    let vq_cfg = clasp::model::emu3_vq::Emu3VqConfig::from_file(&a.model.join("config.json"))?;
    let size = match &a.size {
        Some(s) => s
            .split_once('x')
            .and_then(|(h, w)| Some((h.trim().parse().ok()?, w.trim().parse().ok()?)))
            .with_context(|| format!("--size {s}: expected HEIGHTxWIDTH in pixels, e.g. 64x64"))?,
        None => default_draw_size(&vq_cfg, &clasp::model::emu3_vq::processor_config(&a.model)?),
    };
    let sampling = clasp::llm::sampling::SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        repetition_penalty: 1.0,
        seed: a.seed,
    };
    let opts = DrawOptions {
        size,
        cfg: a.cfg,
        negative_prompt: a.negative_prompt.clone(),
        sampling,
    };
    let Some(list) = &a.prompts_from else {
        let prompt = a.prompt.as_deref().unwrap_or_default();
        // Checked before the model loads.
        let (rows, columns) = check_draw(&vq_cfg, prompt, size)?;
        let m = NativeModel::load(&a.model, &Device::Cpu)?;
        let bar = super::progress_bar(rows as u64, "rows");
        let t0 = std::time::Instant::now();
        let img = m.draw(prompt, &opts, &|r| bar.set_position(r as u64))?;
        bar.finish_and_clear();
        img.save(&a.output)
            .with_context(|| a.output.display().to_string())?;
        let tokens = rows * (columns + 1);
        eprintln!(
            "wrote {} ({}x{} pixels, {tokens} image tokens, {:.1} tokens/s)",
            a.output.display(),
            img.width(),
            img.height(),
            tokens as f64 / t0.elapsed().as_secs_f64()
        );
        return Ok(ExitCode::SUCCESS);
    };
    let text = std::fs::read_to_string(list).with_context(|| list.display().to_string())?;
    let (rows, columns) = check_draw(&vq_cfg, "-", size)?;
    let m = NativeModel::load(&a.model, &Device::Cpu)?;
    std::fs::create_dir_all(&a.output).with_context(|| a.output.display().to_string())?;
    let lines: Vec<&str> = text.lines().collect();
    let bar = super::progress_bar(lines.len() as u64, "images");
    let (t0, mut drawn, mut failed) = (std::time::Instant::now(), 0usize, 0usize);
    let stdout = std::io::stdout();
    for (i, line) in lines.iter().enumerate() {
        bar.inc(1);
        let mut o = opts.clone();
        o.sampling.seed = a.seed.wrapping_add(i as u64);
        let path = a.output.join(format!("{:04}.png", i + 1));
        let made = m
            .draw(line, &o, &|_| {})
            .map_err(anyhow::Error::from)
            .and_then(|img| img.save(&path).with_context(|| path.display().to_string()));
        match made {
            Ok(()) => {
                drawn += 1;
                let row = serde_json::json!({"line": i + 1, "prompt": line, "seed": o.sampling.seed, "path": path});
                writeln!(stdout.lock(), "{row}")?;
            }
            Err(e) => {
                failed += 1;
                bar.suspend(|| eprintln!("error: {}:{}: {e:#}", list.display(), i + 1));
            }
        }
    }
    bar.finish_and_clear();
    eprintln!(
        "drew {drawn} images into {} ({failed} failed; {:.1} image tokens/s)",
        a.output.display(),
        (drawn * rows * (columns + 1)) as f64 / t0.elapsed().as_secs_f64()
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
