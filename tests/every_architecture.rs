//! Every verb with every architecture: for CLIP, Chinese-CLIP, the dual
//! encoder, SigLIP, SigLIP 2 and open_clip's layout (a ViT, a ResNet with
//! attention pooling as OpenAI's RN50 family, and a timm ConvNeXt as
//! LAION's), `index` + `search`,
//! `classify`, `eval zeroshot`, `eval retrieval` and `serve` give what the
//! vectors of `clasp embed` (each architecture's parity with its reference
//! is tested elsewhere) imply, and `train` runs a step and saves a
//! checkpoint that embeds.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64::Engine;
use serde_json::{json, Value};

mod common;

const MODELS: [&str; 8] = [
    "core/tiny-clip",
    "core/tiny-chinese-clip",
    "core/tiny-dual-encoder",
    "siglip/tiny-siglip",
    "siglip/tiny-siglip2",
    "open_clip/tiny-quickgelu",
    "open_clip/tiny-rn",
    "open_clip/tiny-convnext",
];

const CAPTIONS: [&str; 4] = [
    "a dog runs on the grass",
    "two children play in the water",
    "a man climbs a rock",
    "狗在草地上奔跑",
];

fn fixture(m: &str) -> String {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(m);
    if !src.join("manifest.json").is_file() {
        return src.display().to_string();
    }
    // Weights by formula (tests/common), written once per test process.
    static MADE: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let dst = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("every_architecture-{}", std::process::id()))
        .join(m);
    let mut made = MADE.lock().unwrap_or_else(|e| e.into_inner());
    if !made.iter().any(|x| x == m) {
        common::formula_model(&src, &dst);
        made.push(m.to_string());
    }
    dst.display().to_string()
}

fn clasp(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_clasp"))
        .args(args)
        .output()
        .expect("run clasp")
}

fn ok(m: &str, o: Output) -> Value {
    assert!(
        o.status.success(),
        "{m}: clasp failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "{m}: not JSON ({e}): {}",
            String::from_utf8_lossy(&o.stdout)
        )
    })
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn argmax(v: &[f32]) -> usize {
    (0..v.len()).fold(0, |b, j| if v[j] > v[b] { j } else { b })
}

/// Which of `files` a JSON answer's `path` is.
fn index_of(files: &[PathBuf], path: &Value) -> usize {
    let p = PathBuf::from(path.as_str().unwrap())
        .canonicalize()
        .unwrap();
    files
        .iter()
        .position(|f| f.canonicalize().unwrap() == p)
        .unwrap_or_else(|| panic!("{} is not one of the photos", p.display()))
}

/// `clasp embed` of `images` and `texts`: (image vectors in input order,
/// text vectors).
fn embed(m: &str, images: &[PathBuf], texts: &[&str]) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("e.jsonl");
    let mut args: Vec<String> = vec!["embed".into(), "-m".into(), fixture(m)];
    args.extend(["-o".into(), out.display().to_string()]);
    for i in images {
        args.extend(["--image".into(), i.display().to_string()]);
    }
    for t in texts {
        args.extend(["--text".into(), t.to_string()]);
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = clasp(&argv);
    assert!(
        o.status.success(),
        "{m}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let e = common::read_embed_jsonl(&out);
    let by_path: std::collections::HashMap<String, Vec<f32>> = e.images.into_iter().collect();
    let images = images
        .iter()
        .map(|p| by_path[&p.display().to_string()].clone())
        .collect();
    (images, e.texts)
}

/// The model's SigLIP logit scale (exponentiated) and bias, read from its
/// checkpoint; None for softmax models.
fn sigmoid_params(m: &str) -> Option<(f64, f64)> {
    if !m.starts_with("siglip/") {
        return None;
    }
    let t = candle_core::safetensors::load(
        Path::new(&fixture(m)).join("model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let s = |k: &str| t[k].flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] as f64;
    Some((s("logit_scale").exp(), s("logit_bias")))
}

#[test]
fn every_verb_runs_every_architecture_consistently_with_embed() {
    let d = tempfile::tempdir().unwrap();
    let photos = d.path().join("photos");
    let files = common::flickr_photos(&photos, 0..6);
    for m in MODELS {
        let (iv, tv) = embed(m, &files, &CAPTIONS);
        assert_eq!((iv.len(), tv.len()), (6, CAPTIONS.len()), "{m}");

        // index + search: the ranking and scores of the query's cosine.
        let store = d.path().join(format!("{}.sqlite", m.replace('/', "-")));
        let store_s = store.to_str().unwrap();
        let r = ok(
            m,
            clasp(&[
                "index",
                photos.to_str().unwrap(),
                "-m",
                &fixture(m),
                "--store",
                store_s,
                "--json",
            ]),
        );
        assert_eq!(r["embedded"], 6, "{m}: {r}");
        let hits = ok(
            m,
            clasp(&[
                "search",
                CAPTIONS[0],
                "-m",
                &fixture(m),
                "--store",
                store_s,
                "--dir",
                photos.to_str().unwrap(),
                "--no-index",
                "--json",
                "-k",
                "6",
            ]),
        );
        let hits = hits.as_array().unwrap();
        assert_eq!(hits.len(), 6, "{m}");
        for h in hits {
            let i = index_of(&files, &h["path"]);
            let want = dot(&tv[0], &iv[i]);
            let got = h["score"].as_f64().unwrap() as f32;
            assert!(
                (got - want).abs() < 1e-4,
                "{m}: score {got} vs cosine {want}"
            );
        }
        let scores: Vec<f64> = hits.iter().map(|h| h["score"].as_f64().unwrap()).collect();
        assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{m}: ranked");

        // classify with one "{}" template: each image's label is its
        // nearest label text; the probability is CLIP's softmax at 100 or
        // SigLIP's sigmoid with the checkpoint's scale and bias.
        let labels = ["dog", "child", "rock"];
        let (_, lv) = embed(m, &[], &labels);
        let templates = d.path().join("t.txt");
        std::fs::write(&templates, "{}\n").unwrap();
        let got = ok(
            m,
            clasp(&[
                "classify",
                photos.to_str().unwrap(),
                "--labels",
                &labels.join(","),
                "--templates",
                templates.to_str().unwrap(),
                "-m",
                &fixture(m),
                "--store",
                store_s,
                "--json",
            ]),
        );
        let got = got.as_array().unwrap();
        assert_eq!(got.len(), 6, "{m}");
        for g in got {
            let i = index_of(&files, &g["path"]);
            let cos: Vec<f32> = lv.iter().map(|l| dot(&iv[i], l)).collect();
            let best = argmax(&cos);
            assert_eq!(g["label"], labels[best], "{m}: {g}");
            let want = match sigmoid_params(m) {
                Some((scale, bias)) => 1.0 / (1.0 + (-(scale * cos[best] as f64 + bias)).exp()),
                None => {
                    let z: f64 = cos
                        .iter()
                        .map(|c| (100.0 * (c - cos[best]) as f64).exp())
                        .sum();
                    1.0 / z
                }
            };
            let p = g["probability"].as_f64().unwrap();
            assert!((p - want).abs() < 1e-3, "{m}: probability {p} vs {want}");
        }

        // eval zeroshot: accuracy of the nearest class name.
        let ds = d.path().join(format!("zs-{}", m.replace('/', "-")));
        let classes = ["dog", "child"];
        for (j, f) in files.iter().enumerate() {
            let c = ds.join(classes[j % 2]);
            std::fs::create_dir_all(&c).unwrap();
            std::fs::copy(f, c.join(f.file_name().unwrap())).unwrap();
        }
        let cls = d.path().join("classes.txt");
        std::fs::write(&cls, "dog\tdog\nchild\tchild\n").unwrap();
        let j = ok(
            m,
            clasp(&[
                "eval",
                "zeroshot",
                "-m",
                &fixture(m),
                "-d",
                ds.to_str().unwrap(),
                "--classes",
                cls.to_str().unwrap(),
                "--templates",
                templates.to_str().unwrap(),
                "--json",
                "--no-cache",
            ]),
        );
        let correct = (0..6)
            .filter(|&i| argmax(&[dot(&iv[i], &lv[0]), dot(&iv[i], &lv[1])]) == i % 2)
            .count();
        let acc = j["acc1"].as_f64().unwrap();
        assert!(
            (acc - correct as f64 / 6.0).abs() < 1e-12,
            "{m}: zero-shot accuracy {acc} vs {correct}/6"
        );

        // eval retrieval: text→image R@1 over a Flickr8k-layout copy with
        // one caption per photo, by brute force over embed's vectors.
        let f8k = d.path().join(format!("f8k-{}", m.replace('/', "-")));
        std::fs::create_dir_all(f8k.join("images")).unwrap();
        let mut list = String::new();
        let mut tok = String::new();
        let caps = [
            "a dog runs on the grass",
            "two children play in the water",
            "a man climbs a rock",
            "a girl in a pink dress",
            "a black dog and a white dog",
            "people on a street",
        ];
        for (f, c) in files.iter().zip(caps) {
            let name = f.file_name().unwrap().to_str().unwrap();
            std::fs::copy(f, f8k.join("images").join(name)).unwrap();
            list.push_str(&format!("{name}\n"));
            tok.push_str(&format!("{name}#0\t{c}\n"));
        }
        std::fs::write(f8k.join("Flickr_8k.devImages.txt"), list).unwrap();
        std::fs::write(f8k.join("Flickr8k.token.txt"), tok).unwrap();
        let j = ok(
            m,
            clasp(&[
                "eval",
                "retrieval",
                "-m",
                &fixture(m),
                "-d",
                &format!("flickr8k:{}", f8k.display()),
                "--split",
                "dev",
                "--lang",
                "en",
                "--json",
                "--no-cache",
            ]),
        );
        let (_, cv) = embed(m, &[], &caps);
        let hits = (0..6)
            .filter(|&t| {
                let s: Vec<f32> = iv.iter().map(|v| dot(&cv[t], v)).collect();
                argmax(&s) == t
            })
            .count();
        let r1 = j["image_retrieval_recall@1"].as_f64().unwrap();
        assert!(
            (r1 - hits as f64 / 6.0).abs() < 1e-12,
            "{m}: R@1 text→image {r1} vs {hits}/6"
        );

        // serve: /v1/embeddings gives embed's vectors.
        let s = common::Server::start(&["serve", "-m", &fixture(m), "--addr", "127.0.0.1:0"]);
        let b64 =
            base64::engine::general_purpose::STANDARD.encode(std::fs::read(&files[0]).unwrap());
        let (status, v, _) = s.post(
            "/v1/embeddings",
            &json!({"input": [CAPTIONS[0], CAPTIONS[3]], "images": [b64]}),
        );
        assert_eq!(status, 200, "{m}: {v}");
        let data = v["data"].as_array().unwrap();
        let got: Vec<Vec<f32>> = data.iter().map(|x| common::f32s(&x["embedding"])).collect();
        for (g, w) in got.iter().zip([&tv[0], &tv[3], &iv[0]]) {
            let diff = g
                .iter()
                .zip(w)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-5, "{m}: served vector differs by {diff}");
        }
        drop(s);
    }
}

/// `clasp train` runs on each architecture and writes a checkpoint that
/// clasp loads, with the weights changed.
#[test]
fn every_architecture_trains_a_step_and_saves_a_checkpoint_that_embeds() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("f8k");
    std::fs::create_dir_all(data.join("images")).unwrap();
    let files = common::flickr_photos(&data.join("images"), 0..8);
    let mut list = String::new();
    let mut tok = String::new();
    for (i, f) in files.iter().enumerate() {
        let name = f.file_name().unwrap().to_str().unwrap();
        list.push_str(&format!("{name}\n"));
        tok.push_str(&format!("{name}#0\tphoto {i} of a dog\n"));
    }
    std::fs::write(data.join("Flickr_8k.trainImages.txt"), list).unwrap();
    std::fs::write(data.join("Flickr8k.token.txt"), tok).unwrap();
    for m in MODELS {
        let out = d.path().join(m.replace('/', "-"));
        let objective = if m.starts_with("siglip/") {
            "siglip"
        } else {
            "infonce"
        };
        // CNN towers train locked.
        let lock: &[&str] = if m.ends_with("-rn") || m.ends_with("-convnext") {
            &["--lock-image"]
        } else {
            &[]
        };
        let fx = fixture(m);
        let data_arg = format!("flickr8k:{}", data.display());
        let mut args = vec![
            "train",
            "--init",
            &fx,
            "--dataset",
            &data_arg,
            "--objective",
            objective,
            "--batch-size",
            "4",
            "--steps",
            "2",
            "--lr",
            "1e-3",
            "--warmup",
            "1",
            "--output",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(lock);
        let o = clasp(&args);
        assert!(
            o.status.success(),
            "{m}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let ck = out.join("checkpoint");
        let before = embed(m, &files[..1], &["a dog"]);
        let o = clasp(&[
            "embed",
            "-m",
            ck.to_str().unwrap(),
            "--image",
            files[0].to_str().unwrap(),
            "--text",
            "a dog",
        ]);
        assert!(
            o.status.success(),
            "{m}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let lines: Vec<Value> = String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let of = |kind: &str| -> Vec<f32> {
            let l = lines.iter().find(|l| l["type"] == kind).unwrap();
            common::f32s(&l["embedding"])
        };
        let moved = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        };
        let (di, dt) = (
            moved(&of("image"), &before.0[0]),
            moved(&of("text"), &before.1[0]),
        );
        assert!(
            di > 1e-6 && dt > 1e-6,
            "{m}: training changed both towers' vectors ({di}, {dt})"
        );
    }
}
