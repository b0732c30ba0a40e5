//! `clasp train --task vq`: a VQ image tokenizer of Emu3's architecture
//! trained on photos. The run logs its losses and codebook use, restarts
//! unused codes, saves an Emu3VQVAE folder that clasp's tokenizer commands
//! load, and a run stopped and resumed ends with the same bytes as one that
//! was not. Bad sizes and other tasks' keys are refused by name.

mod common;
mod train_e2e_util;

use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use clasp::model::emu3_vq::Emu3Vq;
use train_e2e_util::{fails_with, losses, resume_ok, run_ok, small_flickr, weights};

fn vq_cmd(data: &Path, out: &Path, steps: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_clasp"));
    c.args(["train", "--task", "vq", "--dataset"])
        .arg(format!("flickr8k:{}", data.display()))
        .args([
            "--steps",
            steps,
            "--batch-size",
            "3",
            "--lr",
            "1e-3",
            "--save-every",
            "2",
        ])
        .args(["--set", "vq_image_size=32", "--set", "vq_codebook_size=16"])
        .args(["--set", "vq_restart_every=2", "--output"])
        .arg(out);
    c
}

#[test]
fn vq_tokenizer_trains_saves_an_emu3_folder_and_resumes_exactly() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("f8k");
    small_flickr(&data);
    let out = d.path().join("vq");
    run_ok(vq_cmd(&data, &out, "4"));
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 4);
    for r in &rows {
        let l = &r["losses"];
        for part in ["recon_l1", "codebook", "commit", "perplexity", "codes_used"] {
            assert!(l[part].as_f64().unwrap().is_finite(), "{part}: {r}");
        }
        // Perplexity is at most the codes used, which are at most the codebook.
        let (p, used) = (
            l["perplexity"].as_f64().unwrap(),
            l["codes_used"].as_f64().unwrap(),
        );
        assert!(p >= 1.0 - 1e-9 && p <= used + 1e-9 && used <= 16.0, "{r}");
        // The total is reconstruction + codebook + 0.25 x commitment.
        let want = l["recon_l1"].as_f64().unwrap()
            + l["codebook"].as_f64().unwrap()
            + 0.25 * l["commit"].as_f64().unwrap();
        common::close_to(r["loss"].as_f64().unwrap(), want, 1e-5, "total loss");
    }
    // Every second step checks for unused codes.
    // The first step seeds the unused codes from the data.
    assert!(
        rows[0]["losses"]["restarted"].as_f64().unwrap() > 0.0,
        "{}",
        rows[0]
    );
    assert!(
        rows[1]["losses"]["restarted"].as_f64().is_some(),
        "{}",
        rows[1]
    );
    assert!(rows[2]["losses"].get("restarted").is_none(), "{}", rows[2]);

    // The checkpoint is an Emu3VQVAE folder: it loads, tokenizes a photo
    // into 4 x 4 codes of the 16, and draws them back.
    let ckpt = out.join("checkpoint");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "emu3_vqgan");
    assert_eq!(cfg["temporal_downsample_factor"], 1);
    let vq = Emu3Vq::from_dir(&ckpt, &Device::Cpu).unwrap();
    let px = Tensor::zeros((1, 3, 32, 32), DType::F32, &Device::Cpu).unwrap();
    let codes = vq.encode(&px).unwrap();
    assert_eq!(codes.dims(), [1, 4, 4]);
    assert_eq!(vq.decode(&codes).unwrap().dims(), [1, 3, 32, 32]);
    let photo = std::fs::read_dir(data.join("images"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let o = common::clasp(&[
        "tokenize-image",
        "-m",
        ckpt.to_str().unwrap(),
        photo.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    eval_reports(&ckpt, &out.join("init"), &data, d.path());

    // Stopped after 2 steps and resumed: the same bytes as the run above.
    let again = d.path().join("again");
    let mut c = vq_cmd(&data, &again, "4");
    c.args(["--stop-after", "2"]);
    run_ok(c);
    assert_eq!(losses(&again).len(), 2);
    resume_ok(&again);
    assert_eq!(losses(&again), losses(&out));
    assert_eq!(
        weights(&again),
        weights(&out),
        "a resumed run ends as an uninterrupted one"
    );

    // Refused by name.
    let mut c = vq_cmd(&data, &d.path().join("x1"), "2");
    c.args(["--set", "vq_image_size=30"]);
    fails_with(c, "vq_image_size");
    let mut c = vq_cmd(&data, &d.path().join("x2"), "2");
    c.args(["--set", "lora_rank=4"]);
    fails_with(c, "`lora_rank`");
    let mut c = Command::new(env!("CARGO_BIN_EXE_clasp"));
    c.args(["train", "--dataset"])
        .arg(format!("flickr8k:{}", data.display()))
        .args(["--preset", "tiny", "--set", "vq_beta=1", "--output"])
        .arg(d.path().join("x3"));
    fails_with(c, "`vq_beta`");
}

/// `clasp eval vq` on the run's checkpoint: codebook use, PSNR, SSIM and the
/// perceptual score beside the wrong photo, the thumbnail and the untrained
/// start, each control with its paired t; the report's files; its PSNR is
/// the mean of the per-photo rows.
fn eval_reports(ckpt: &Path, init: &Path, data: &Path, tmp: &Path) {
    let report = tmp.join("vq-report");
    let mnv2 = common::pretrained("mobilenet_v2");
    let o = common::clasp(&[
        "eval",
        "vq",
        "-m",
        ckpt.to_str().unwrap(),
        "-d",
        &format!("flickr8k:{}", data.display()),
        "--split",
        "train",
        "--limit",
        "3",
        "--baseline",
        init.to_str().unwrap(),
        "--perceptual",
        mnv2.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["photos"], 3);
    assert_eq!(r["codebook"]["size"], 16);
    let used = r["codebook"]["used"].as_f64().unwrap();
    assert!(
        used >= 1.0 && r["codebook"]["perplexity"].as_f64().unwrap() <= used + 1e-9,
        "{r}"
    );
    for metric in ["psnr", "ssim", "perceptual"] {
        for control in ["wrong_photo", "thumbnail", "baseline"] {
            let t = &r["scores"][metric][control]["reconstruction_minus_this"]["paired_t"];
            assert!(t.is_number(), "{metric} {control}: {r}");
        }
    }
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(report.join("per_image.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mean = rows
        .iter()
        .map(|x| x["psnr"]["reconstruction"].as_f64().unwrap())
        .sum::<f64>()
        / 3.0;
    common::close_to(
        r["scores"]["psnr"]["reconstruction"]["mean"]
            .as_f64()
            .unwrap(),
        mean,
        1e-12,
        "mean PSNR",
    );
    let grid = image::open(report.join("grid.png")).unwrap();
    assert_eq!(
        (grid.width(), grid.height()),
        (32 * 8, 64),
        "photos over reconstructions"
    );
}
