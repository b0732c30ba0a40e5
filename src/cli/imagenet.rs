//! `clasp classify --imagenet MODEL.pth DIR`: a pretrained ImageNet
//! classifier's own labels for a folder's images (no store, no prompts).

use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use clasp::model::cnn_tower::ImageNetClassifier;
use clasp::preprocess::ImageProcessor;

/// Images per forward pass.
const BATCH: usize = 16;

#[derive(serde::Serialize)]
struct Label<'a> {
    path: String,
    label: &'a str,
    probability: f32,
}

/// Labels every image of `dir` (sorted by path) with its top ImageNet class.
/// A file that cannot be read is reported by name and the rest go on; the
/// exit code is then 1.
pub fn classify(model: &Path, dir: &Path, json: bool) -> Result<ExitCode> {
    let dev = Device::Cpu;
    let clf = ImageNetClassifier::load(model, &dev)?;
    let cfg = clf.processor();
    let (ch, cw) = cfg.crop;
    let proc = ImageProcessor::new(cfg);
    let (files, _) = clasp::data::files::list_image_files(dir)?;
    if files.is_empty() {
        bail!("{}: no image files", dir.display());
    }
    let (mut out, mut failed) = (Vec::new(), 0usize);
    for chunk in files.chunks(BATCH) {
        let (mut px, mut ok) = (Vec::new(), Vec::new());
        for f in chunk {
            match proc.process_path(f) {
                Ok(p) => {
                    px.extend(p);
                    ok.push(f);
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    failed += 1;
                }
            }
        }
        if ok.is_empty() {
            continue;
        }
        let t = Tensor::from_vec(px, (ok.len(), 3, ch as usize, cw as usize), &dev)?;
        for (f, p) in ok.iter().zip(clf.probabilities(&t)?.to_vec2::<f32>()?) {
            let (i, prob) = p
                .iter()
                .copied()
                .enumerate()
                .fold((0, f32::MIN), |b, (i, v)| if v > b.1 { (i, v) } else { b });
            out.push(Label {
                path: f.display().to_string(),
                label: clf.labels()[i],
                probability: prob,
            });
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for l in &out {
            println!("{}\t{:.3}\t{}", l.label, l.probability, l.path);
        }
    }
    if failed > 0 {
        eprintln!("{failed} of {} files could not be read", files.len());
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}
