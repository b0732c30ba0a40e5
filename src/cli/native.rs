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

fn open(model: &std::path::Path) -> Result<(Emu3Vq, ImageProcessorConfig)> {
    let vq = Emu3Vq::from_dir(model, &Device::Cpu)?;
    let pp = model.join("preprocessor_config.json");
    let cfg = if pp.is_file() {
        ImageProcessorConfig::from_file(&pp)?
    } else {
        let json = r#"{"image_processor_type": "Emu3ImageProcessor"}"#;
        ImageProcessorConfig::from_json(json, &pp)?
    };
    Ok((vq, cfg))
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
