//! End-to-end tests of `clasp embed` against transformers' outputs
//! (tests/fixtures/core, made by scripts/gen_core_fixtures.py) and on bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{Device, Tensor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/core")
}

fn clasp(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_clasp"))
        .args(args)
        .output()
        .expect("run clasp")
}

fn expected(key: &str) -> Tensor {
    let m = candle_core::safetensors::load(
        fixtures().join("models_expected.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    m[key].clone()
}

fn normalized(t: &Tensor) -> Vec<Vec<f32>> {
    clasp::model::l2_normalize(t).unwrap().to_vec2().unwrap()
}

fn max_abs(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len(), "row count");
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

const FILES: [&str; 3] = ["images/rgb.png", "images/alpha.png", "images/palette.png"];

fn check_npy_output(model: &str, prefix: &str, texts_file: &str) {
    check_npy_output_on(model, prefix, texts_file, None)
}

/// As `check_npy_output`, with the f32 kernel forced (`CLASP_F32_KERNEL`).
fn check_npy_output_on(model: &str, prefix: &str, texts_file: &str, f32_kernel: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("emb.npy");
    let texts: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join(texts_file)).unwrap())
            .unwrap();
    let texts_path = dir.path().join("texts.txt");
    std::fs::write(&texts_path, texts.join("\n")).unwrap();
    let model_dir = fixtures().join(model);
    let mut args = vec!["embed", "--model", model_dir.to_str().unwrap()];
    let files: Vec<String> = FILES
        .iter()
        .map(|f| fixtures().join(f).display().to_string())
        .collect();
    for f in &files {
        args.extend(["--image", f]);
    }
    args.extend([
        "--texts-from",
        texts_path.to_str().unwrap(),
        "--batch-size",
        "2",
    ]);
    args.extend(["--output", out.to_str().unwrap()]);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_clasp"));
    if let Some(k) = f32_kernel {
        cmd.env("CLASP_F32_KERNEL", k);
    }
    let o = cmd.args(&args).output().expect("run clasp");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let img = Tensor::read_npy(dir.path().join("emb.image.npy")).unwrap();
    let txt = Tensor::read_npy(dir.path().join("emb.text.npy")).unwrap();
    let want_img = normalized(&expected(&format!("{prefix}.file_image_features")));
    let want_txt = normalized(&expected(&format!("{prefix}.text_features")));
    let d_img = max_abs(&img.to_vec2().unwrap(), &want_img);
    let d_txt = max_abs(&txt.to_vec2().unwrap(), &want_txt);
    assert!(
        d_img <= 1e-4,
        "{model} ({f32_kernel:?}): image embeddings differ by {d_img}"
    );
    assert!(
        d_txt <= 1e-4,
        "{model} ({f32_kernel:?}): text embeddings differ by {d_txt}"
    );
    // rows are unit length and in input order (the path list says which is which)
    let paths = std::fs::read_to_string(dir.path().join("emb.image.paths.txt")).unwrap();
    assert_eq!(paths.lines().collect::<Vec<_>>(), files);

    // --similarity prints logits_per_image as CLIPModel computes it
    let mut sargs = vec![
        "embed",
        "--model",
        model_dir.to_str().unwrap(),
        "--similarity",
    ];
    for f in &files {
        sargs.extend(["--image", f]);
    }
    sargs.extend(["--texts-from", texts_path.to_str().unwrap()]);
    let o = clasp(&sargs);
    assert!(o.status.success());
    let stdout = String::from_utf8(o.stdout).unwrap();
    let rows: Vec<Vec<f32>> = stdout
        .lines()
        .filter(|l| l.contains("images/"))
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .map(|v| v.parse().unwrap())
                .collect()
        })
        .collect();
    let want: Vec<Vec<f32>> = expected(&format!("{prefix}.file_logits_per_image"))
        .to_vec2()
        .unwrap();
    // printed with 4 decimals
    let d = max_abs(&rows, &want);
    assert!(d <= 1e-3, "{model}: printed logits differ by {d}\n{stdout}");
}

#[test]
fn embed_clip_matches_transformers() {
    check_npy_output("tiny-clip", "clip", "tiny-clip.texts.json");
}

#[test]
fn embed_chinese_clip_matches_transformers() {
    check_npy_output("tiny-chinese-clip", "cn", "tiny-chinese-clip.texts.json");
}

#[test]
fn jsonl_and_safetensors_hold_the_same_vectors() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("tiny-clip");
    let img = fixtures().join(FILES[0]);
    let (j, s) = (dir.path().join("e.jsonl"), dir.path().join("e.safetensors"));
    for out in [&j, &s] {
        let o = clasp(&[
            "embed",
            "--model",
            model.to_str().unwrap(),
            "--image",
            img.to_str().unwrap(),
            "--text",
            "a cat",
            "--output",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&j)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["type"], "image");
    assert_eq!(lines[1]["input"], "a cat");
    let st = candle_core::safetensors::load(&s, &Device::Cpu).unwrap();
    let from_st: Vec<Vec<f32>> = st["text_embeds"].to_vec2().unwrap();
    let from_j: Vec<f32> = serde_json::from_value(lines[1]["embedding"].clone()).unwrap();
    assert_eq!(from_st[0], from_j);
    let norm: f32 = from_j.iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5);
}

#[test]
fn a_batch_goes_on_past_bad_files_and_lists_them() {
    let dir = tempfile::tempdir().unwrap();
    let unreadable = dir.path().join("unreadable.jpg");
    std::fs::copy(fixtures().join("images/rgb.jpg"), &unreadable).unwrap();
    std::fs::set_permissions(
        &unreadable,
        std::os::unix::fs::PermissionsExt::from_mode(0o000),
    )
    .unwrap();
    if std::fs::read(&unreadable).is_ok() {
        // Running as root: permissions do not stop reads. A dangling symlink is
        // the other way a listed file cannot be read.
        std::fs::remove_file(&unreadable).unwrap();
        std::os::unix::fs::symlink(dir.path().join("gone.jpg"), &unreadable).unwrap();
    }
    let good = fixtures().join("images/rgb.png");
    let bad = [
        fixtures().join("images/zero.jpg"),
        fixtures().join("images/truncated.jpg"),
        fixtures().join("images/not-an-image.png"),
        unreadable.clone(),
        fixtures().join("images"), // a directory given as an image
    ];
    let out = dir.path().join("e.jsonl");
    let mut args = vec![
        "embed".to_string(),
        "--model".into(),
        fixtures().join("tiny-clip").display().to_string(),
    ];
    args.extend(["--image".into(), good.display().to_string()]);
    for b in &bad {
        args.extend(["--image".into(), b.display().to_string()]);
    }
    args.extend([
        "--image".into(),
        good.display().to_string(),
        "-o".into(),
        out.display().to_string(),
    ]);
    let o = Command::new(env!("CARGO_BIN_EXE_clasp"))
        .args(&args)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "partial failure exits 1");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("5 of 7 images failed"), "{err}");
    for b in &bad {
        assert!(
            err.contains(&b.display().to_string()),
            "failure for {} not named:\n{err}",
            b.display()
        );
    }
    assert!(err.contains("truncated"), "{err}");
    assert!(err.contains("empty file"), "{err}");
    // the two good images were still embedded
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 2);
}

#[test]
fn a_directory_of_non_images_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), "hello").unwrap();
    let o = clasp(&[
        "embed",
        "--model",
        fixtures().join("tiny-clip").to_str().unwrap(),
        "--images-from",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(dir.path().to_str().unwrap()) && err.contains("no images"),
        "{err}"
    );
}

#[test]
fn missing_weights_and_unsupported_architecture_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("tiny-clip");
    for f in ["config.json", "tokenizer.json", "preprocessor_config.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let o = clasp(&[
        "embed",
        "--model",
        dir.path().to_str().unwrap(),
        "--text",
        "x",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        err.contains("no weights found") && err.contains(dir.path().to_str().unwrap()),
        "{err}"
    );

    std::fs::copy(
        src.join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    std::fs::write(dir.path().join("config.json"), r#"{"model_type": "blip"}"#).unwrap();
    let o = clasp(&[
        "embed",
        "--model",
        dir.path().to_str().unwrap(),
        "--text",
        "x",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("unsupported architecture `blip`") && err.contains("clip, chinese_clip"),
        "{err}"
    );
}

#[test]
fn over_long_text_is_truncated_with_a_warning() {
    let long = "a cat and a dog ".repeat(40);
    let o = clasp(&[
        "embed",
        "--model",
        fixtures().join("tiny-clip").to_str().unwrap(),
        "--text",
        &long,
    ]);
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("truncated to 16 tokens"), "{err}");
}

#[test]
fn every_supported_format_decodes() {
    for f in [
        "rgb.jpg",
        "rgb.png",
        "rgb.webp",
        "rgb.bmp",
        "rgb.tiff",
        "anim.gif",
        "gray.png",
        "palette.png",
        "alpha.png",
        "gray16.png",
        "cmyk.jpg",
        "exif6.jpg",
    ] {
        let img = clasp::preprocess::load_image(&fixtures().join("images").join(f))
            .unwrap_or_else(|e| panic!("{f}: {e}"));
        // exif6.jpg is stored rotated; orientation 6 turns it back to 60x45
        assert_eq!(img.dimensions(), (60, 45), "{f}");
    }
}

/// CMYK, palette, alpha, EXIF-rotated and GIF images decode to the pixels
/// Pillow gives (scripts/gen_decode_fixtures.py: exif_transpose, then
/// transformers' convert_to_rgb). PNG and GIF decodes are lossless and must
/// match exactly; JPEG decoders differ in their IDCT rounding, so those get
/// a small per-pixel tolerance and a tight mean.
#[test]
fn odd_formats_decode_to_pillows_pixels() {
    use base64::Engine;
    let fx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("decoded.json")).unwrap())
            .unwrap();
    for (name, want) in fx.as_object().unwrap() {
        let img = clasp::preprocess::load_image(&fixtures().join("images").join(name)).unwrap();
        assert_eq!(
            (img.width() as u64, img.height() as u64),
            (
                want["width"].as_u64().unwrap(),
                want["height"].as_u64().unwrap()
            ),
            "{name}"
        );
        let pil = base64::engine::general_purpose::STANDARD
            .decode(want["rgb"].as_str().unwrap())
            .unwrap();
        let ours = img.as_raw();
        assert_eq!(ours.len(), pil.len(), "{name}");
        let diffs: Vec<i32> = ours
            .iter()
            .zip(&pil)
            .map(|(a, b)| (*a as i32 - *b as i32).abs())
            .collect();
        let max = *diffs.iter().max().unwrap();
        let mean = diffs.iter().sum::<i32>() as f64 / diffs.len() as f64;
        if name.ends_with(".jpg") {
            assert!(
                max <= 8 && mean < 1.0,
                "{name}: max diff {max}, mean {mean:.3}"
            );
        } else {
            assert_eq!(max, 0, "{name}: max diff {max}, mean {mean:.3}");
        }
    }
}

/// An output path whose folder does not exist is refused before any work,
/// naming the path.
#[test]
fn a_bad_output_path_is_refused_before_embedding() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("nodir").join("sub").join("out.npy");
    let o = clasp(&[
        "embed",
        "-m",
        fixtures().join("tiny-clip").to_str().unwrap(),
        "--text",
        "a dog",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(out.to_str().unwrap()), "{err}");
    assert!(err.contains("does not exist"), "{err}");
}

/// `--precision int8` under each int8 kernel this CPU runs (forced through
/// CLASP_INT8_KERNEL): the integer products are exact on every path, so the
/// vectors are identical, and they differ from f32's.
#[test]
fn int8_embeddings_are_identical_on_every_kernel() {
    let model = fixtures().join("tiny-clip");
    let img = fixtures().join(FILES[0]);
    let run = |precision: &str, kernel: &str| -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_clasp"))
            .env("CLASP_INT8_KERNEL", kernel)
            .args(["embed", "--model", model.to_str().unwrap()])
            .args(["--image", img.to_str().unwrap()])
            .args(["--text", "a photo of a dog", "--precision", precision])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let kernels: Vec<&str> = clasp::model::int8::Int8Kernel::available()
        .into_iter()
        .map(|k| k.name())
        .collect();
    let scalar = run("int8", "scalar");
    for k in &kernels {
        assert_eq!(run("int8", k), scalar, "int8 on {k} differs from scalar");
    }
    assert_ne!(run("f32", "scalar"), scalar, "int8 output equals f32's");
    // bf16 runs where the CPU has it, and is refused with a reason elsewhere.
    let bf16 = clasp(&[
        "embed",
        "--model",
        model.to_str().unwrap(),
        "--text",
        "x",
        "--precision",
        "bf16",
    ]);
    if clasp::model::packed::bf16_supported() {
        assert!(
            bf16.status.success(),
            "{}",
            String::from_utf8_lossy(&bf16.stderr)
        );
    } else {
        assert!(String::from_utf8_lossy(&bf16.stderr).contains("avx512_bf16"));
    }
    let bad = clasp(&[
        "embed",
        "--model",
        model.to_str().unwrap(),
        "--text",
        "x",
        "--precision",
        "int4",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("f32, int8 or bf16"));
}

/// The prepacked f32 kernels (each one this CPU runs, forced through
/// CLASP_F32_KERNEL) and the `gemm` crate keep parity with transformers.
#[test]
fn embed_matches_transformers_on_every_f32_kernel() {
    let mut kernels = vec!["gemm"];
    kernels.extend(
        clasp::model::packed::F32Kernel::available()
            .into_iter()
            .map(|k| k.name()),
    );
    for k in kernels {
        check_npy_output_on("tiny-clip", "clip", "tiny-clip.texts.json", Some(k));
        check_npy_output_on(
            "tiny-chinese-clip",
            "cn",
            "tiny-chinese-clip.texts.json",
            Some(k),
        );
    }
}

/// `clasp quantize` writes int8 weights with their scales; the checkpoint
/// embeds exactly as `--precision int8` does on the original, and refuses f32.
#[test]
fn a_quantized_checkpoint_embeds_as_precision_int8_does() {
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("q8");
    let model = fixtures().join("tiny-clip");
    let o = clasp(&[
        "quantize",
        "-m",
        model.to_str().unwrap(),
        "-o",
        q.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bytes = std::fs::read(q.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let w = st
        .tensor("text_model.encoder.layers.0.self_attn.q_proj.weight")
        .unwrap();
    assert_eq!(w.dtype(), safetensors::Dtype::I8);
    let s = st
        .tensor("text_model.encoder.layers.0.self_attn.q_proj.weight_scale")
        .unwrap();
    assert_eq!(
        (s.dtype(), s.shape()),
        (safetensors::Dtype::F32, &[w.shape()[0]][..])
    );
    // The patch embedding and the projections stay f32.
    assert_eq!(
        st.tensor("visual_projection.weight").unwrap().dtype(),
        safetensors::Dtype::F32
    );
    assert!(q.join("tokenizer.json").is_file() || q.join("vocab.json").is_file());

    let img = fixtures().join(FILES[0]);
    let embed = |m: &std::path::Path, extra: &[&str]| {
        let mut args = vec!["embed", "--model", m.to_str().unwrap()];
        args.extend([
            "--image",
            img.to_str().unwrap(),
            "--text",
            "a photo of a dog",
        ]);
        args.extend(extra);
        clasp(&args)
    };
    let runtime = embed(&model, &["--precision", "int8"]);
    let saved = embed(&q, &[]);
    assert!(
        saved.status.success(),
        "{}",
        String::from_utf8_lossy(&saved.stderr)
    );
    assert_eq!(saved.stdout, runtime.stdout);
    let f32 = embed(&q, &["--precision", "f32"]);
    assert!(!f32.status.success());
    let err = String::from_utf8_lossy(&f32.stderr);
    assert!(err.contains("int8") && err.contains("q8"), "{err}");
}
