//! The native (Emu3-layout) model against transformers'
//! `Emu3ForConditionalGeneration` on the folder `clasp assemble --native`
//! saves (fixtures: scripts/gen_native_fixtures.py, which assembles the
//! committed random-weight VQ tokenizer with SmolLM2, then runs transformers
//! and Emu3Processor on the saved folder). clasp rebuilds the same model
//! (same seed) and must give the processor's ids (the image span as its
//! placeholders), the VQ codes, and the logits.

mod common;
mod train_e2e_util;
mod vlm_util;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::Device;
use clasp::vlm::native::NativeModel;
use serde_json::Value;
use vlm_util::{check_logits, u32s};

fn fixture() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/native/native_logits.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn vq_dir() -> &'static PathBuf {
    static D: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &D.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        let p = common::emu3_vq_folder(d.path());
        (d, p)
    })
    .1
}

fn model() -> &'static NativeModel {
    static M: OnceLock<NativeModel> = OnceLock::new();
    M.get_or_init(|| NativeModel::assemble(&common::smollm2(), vq_dir(), 0, &Device::Cpu).unwrap())
}

/// clasp's ids with the image span's code and end-of-row tokens written
/// as the processor's placeholder.
fn as_placeholders(m: &NativeModel, ids: &[u32]) -> Vec<u32> {
    let t = m.tokens;
    ids.iter()
        .map(|&i| {
            if t.code(i).is_some() || i == t.eol {
                t.placeholder
            } else {
                i
            }
        })
        .collect()
}

fn argmax(l: &[Vec<f32>]) -> Vec<u32> {
    l.iter()
        .map(|r| {
            r.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0 as u32
        })
        .collect()
}

fn logits(m: &NativeModel, ids: &[u32]) -> Vec<Vec<f32>> {
    m.logits(ids).unwrap().to_vec2().unwrap()
}

#[test]
fn ids_codes_and_logits_equal_transformers_emu3() {
    let m = model();
    let f = fixture();
    assert_eq!(
        m.tokens.first_code as u64,
        f["first_code"].as_u64().unwrap()
    );
    let prompt = f["prompt"].as_str().unwrap();
    let mut worst = 0f32;
    for c in f["cases"].as_array().unwrap() {
        let name = c["image"].as_str().unwrap();
        let photo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(name);
        let codes = m.image_codes(&photo).unwrap();
        let want: Vec<Vec<u32>> = c["codes"].as_array().unwrap().iter().map(u32s).collect();
        assert_eq!(codes, want, "{name}: VQ codes");
        let ids = m.prompt_ids(prompt, &[codes]).unwrap();
        assert_eq!(
            as_placeholders(m, &ids),
            u32s(&c["input_ids"]),
            "{name}: ids"
        );
        worst = worst.max(check_logits(name, &logits(m, &ids), c));
    }
    // The drawing prompt: caption, then the image's start and size prefix.
    let d = &f["draw"];
    let sizes = u32s(&d["image_sizes"]);
    let ids = m
        .draw_prompt_ids(
            d["caption"].as_str().unwrap(),
            sizes[0] as usize,
            sizes[1] as usize,
        )
        .unwrap();
    assert_eq!(ids, u32s(&d["input_ids"]), "drawing prompt ids");
    let l = logits(m, &ids);
    assert_eq!(argmax(&l), u32s(&d["argmax"]), "drawing prompt: argmax");
    for (key, ids_key) in [("fixed", "fixed_ids"), ("top", "top_ids")] {
        let rows = d[key].as_array().unwrap();
        let last = &l[l.len() - rows.len()..];
        for (p, (row, want)) in last.iter().zip(rows).enumerate() {
            let ids = match &d[ids_key][0] {
                Value::Array(_) => u32s(&d[ids_key][p]),
                _ => u32s(&d[ids_key]),
            };
            for (id, w) in ids.iter().zip(vlm_util::f32s(want)) {
                let diff = (row[*id as usize] - w).abs();
                assert!(
                    diff < 1e-3,
                    "drawing prompt: {key} logit of {id} at {p}: {diff}"
                );
                worst = worst.max(diff);
            }
        }
    }
    eprintln!("largest logit difference against transformers: {worst:.2e}");
}

/// What clasp saves, clasp loads back with the same logits.
#[test]
fn a_saved_native_model_loads_back() {
    let m = model();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("native");
    m.save(&dir).unwrap();
    let back = NativeModel::load(&dir, &Device::Cpu).unwrap();
    assert_eq!(back.tokens, m.tokens);
    let codes = vec![vec![5u32, 32767, 0], vec![1, 2, 3]];
    let ids = m
        .prompt_ids("<image>\nDescribe the image.", std::slice::from_ref(&codes))
        .unwrap();
    assert_eq!(
        back.prompt_ids("<image>\nDescribe the image.", &[codes])
            .unwrap(),
        ids
    );
    let (a, b) = (m.logits(&ids).unwrap(), back.logits(&ids).unwrap());
    let diff = common::max_abs(&a, &b);
    assert!(diff < 1e-4, "saved and loaded logits differ by {diff}");
    // The wrong number of images is named.
    let err = m
        .prompt_ids("<image> and <image>", &[vec![vec![1]]])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("2 `<image>`") && err.contains("1 images"),
        "{err}"
    );
    draws(m, &dir);
    serves(&dir);

    // A bridge folder is not a native model.
    std::fs::write(dir.join("config.json"), r#"{"model_type": "llava"}"#).unwrap();
    let err = NativeModel::load(&dir, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not a native"), "{err}");
}

/// `clasp draw`: a PNG of the asked size whose codes follow the row
/// structure, the same for the same seed; bad prompts, sizes and models are
/// named.
fn draws(m: &NativeModel, dir: &Path) {
    use clasp::vlm::native::{DrawOptions, NEGATIVE_PROMPT};
    let opts = DrawOptions {
        size: (24, 16),
        cfg: 3.0,
        negative_prompt: NEGATIVE_PROMPT.into(),
        sampling: clasp::llm::sampling::SamplingParams {
            temperature: 1.0,
            top_k: 2048,
            seed: 7,
            ..Default::default()
        },
    };
    let codes = m.draw_codes("a dog on the beach", &opts, &|_| {}).unwrap();
    assert_eq!(
        (codes.len(), codes[0].len()),
        (3, 2),
        "rows and columns of codes"
    );
    assert!(codes
        .iter()
        .flatten()
        .all(|&c| (c as usize) < m.tokens.codebook));
    assert_eq!(
        m.draw_codes("a dog on the beach", &opts, &|_| {}).unwrap(),
        codes,
        "seeded"
    );

    let d = dir.to_str().unwrap();
    let out = dir.parent().unwrap().join("dog.png");
    let o = common::clasp(&[
        "draw",
        "a dog on the beach",
        "-m",
        d,
        "--size",
        "24x16",
        "--seed",
        "7",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let img = image::open(&out).unwrap();
    assert_eq!((img.width(), img.height()), (16, 24));
    assert!(String::from_utf8_lossy(&o.stderr).contains("tokens/s"));
    let fails = |args: &[&str], needle: &str| {
        let o = common::clasp(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(needle),
            "{args:?}: {err}"
        );
    };
    fails(
        &["draw", "  ", "-m", d, "-o", "x.png"],
        "the prompt is empty",
    );
    fails(
        &["draw", "a dog", "-m", d, "--size", "20x16", "-o", "x.png"],
        "20x16",
    );
    let vq = vq_dir().to_str().unwrap();
    fails(&["draw", "a dog", "-m", vq, "-o", "x.png"], "not a native");

    // A list of prompts: line n drawn with seed + n − 1, an empty line
    // named and skipped, the others drawn.
    let list = dir.parent().unwrap().join("prompts.txt");
    std::fs::write(&list, "a dog on the beach\n\na red bus\n").unwrap();
    let many = dir.parent().unwrap().join("many");
    let o = common::clasp(&[
        "draw",
        "--prompts-from",
        list.to_str().unwrap(),
        "-m",
        d,
        "--size",
        "24x16",
        "--seed",
        "7",
        "-o",
        many.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("prompts.txt:2") && err.contains("the prompt is empty"),
        "{err}"
    );
    let rows: Vec<Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(
        (rows[1]["line"].as_u64(), rows[1]["seed"].as_u64()),
        (Some(3), Some(9))
    );
    let first = image::open(many.join("0001.png")).unwrap().to_rgb8();
    assert!(
        first == image::open(&out).unwrap().to_rgb8(),
        "line 1 is seed 7's drawing"
    );
    assert!(many.join("0003.png").is_file() && !many.join("0002.png").exists());
}

/// `clasp serve --vlm NATIVE`: the chat API answers as `clasp chat` does,
/// `/v1/images/generations` draws what `clasp draw` draws for the same seed
/// (its size in OpenAI's WIDTHxHEIGHT), and bad requests are named.
fn serves(dir: &Path) {
    use base64::Engine;
    let d = dir.to_str().unwrap();
    let photo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data/flickr8k/images/2090545563_a4e66ec76b.jpg");
    let s = common::Server::start(&["serve", "--vlm", d, "--addr", "127.0.0.1:0"]);
    let url = format!(
        "data:image/jpeg;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(std::fs::read(&photo).unwrap())
    );
    let (status, v, _) = s.post(
        "/v1/chat/completions",
        &serde_json::json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": "Describe the image."}]}],
            "max_tokens": 6, "temperature": 0}),
    );
    assert_eq!(status, 200, "{v}");
    let o = common::clasp(
        &["chat", "-m", d, "--image", photo.to_str().unwrap()]
            .into_iter()
            .chain([
                "--prompt",
                "<image>\nDescribe the image.",
                "--max-tokens",
                "6",
            ])
            .collect::<Vec<_>>(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cli = String::from_utf8(o.stdout).unwrap();
    assert!(!cli.trim().is_empty(), "an empty answer proves nothing");
    assert_eq!(v["choices"][0]["message"]["content"], cli.trim_end(), "{v}");

    let body = serde_json::json!({"prompt": "a dog on the beach", "size": "16x24", "seed": 7,
        "guidance_scale": 3, "top_k": 2048, "n": 2, "response_format": "b64_json"});
    let (status, v, _) = s.post("/v1/images/generations", &body);
    assert_eq!(status, 200, "{v}");
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    let png = |i: usize| {
        let b = data[i]["b64_json"].as_str().unwrap();
        let bytes = base64::engine::general_purpose::STANDARD.decode(b).unwrap();
        image::load_from_memory(&bytes).unwrap().to_rgb8()
    };
    let drawn = image::open(dir.parent().unwrap().join("dog.png"))
        .unwrap()
        .to_rgb8();
    assert_eq!((png(0).width(), png(0).height()), (16, 24));
    assert!(
        png(0) == drawn,
        "the served drawing differs from clasp draw's (seed 7)"
    );
    assert!(
        png(1) != drawn,
        "the second image is drawn with the next seed"
    );
    for (body, param) in [
        (serde_json::json!({"prompt": " "}), "prompt"),
        (
            serde_json::json!({"prompt": "a dog", "size": "16x20"}),
            "size",
        ),
        (
            serde_json::json!({"prompt": "a dog", "size": "big"}),
            "size",
        ),
        (
            serde_json::json!({"prompt": "a dog", "response_format": "url"}),
            "response_format",
        ),
        (serde_json::json!({"prompt": "a dog", "n": 9}), "n"),
    ] {
        let (status, v, _) = s.post("/v1/images/generations", &body);
        assert_eq!(
            (status, v["error"]["param"].as_str()),
            (400, Some(param)),
            "{body}: {v}"
        );
    }
    let doc: Value = serde_json::from_str(&s.get("/openapi.json")).unwrap();
    assert!(doc["paths"]["/v1/images/generations"].is_object());
    drop(s);

    // `clasp eval caption` scores what `clasp caption` writes.
    let data = dir.parent().unwrap().join("f8k");
    train_e2e_util::small_flickr(&data);
    let report = dir.parent().unwrap().join("report");
    let o = common::clasp(&[
        "eval",
        "caption",
        "-m",
        d,
        "-d",
        &format!("flickr8k:{}", data.display()),
        "--split",
        "dev",
        "--limit",
        "2",
        "--max-tokens",
        "6",
        "--json",
        "--report",
        report.to_str().unwrap(),
    ]);
    let v = common::ok(&o);
    assert_eq!(v["images"], 2, "{v}");
    assert!(v["scores"]["cider_d"].as_f64().unwrap().is_finite());
    let rep: Value =
        serde_json::from_str(&std::fs::read_to_string(report.join("captions.json")).unwrap())
            .unwrap();
    let first = &rep["captions"][0];
    let o = common::clasp(&[
        "caption",
        "-m",
        d,
        "--max-tokens",
        "6",
        "--json",
        first["image"].as_str().unwrap(),
    ]);
    let cli = common::ok(&o);
    assert_eq!(
        cli[0]["caption"].as_str().unwrap().trim(),
        first["caption"].as_str().unwrap(),
        "{cli}"
    );

    // `clasp ask` answers with a native model over photos from a store:
    // the sources are what `clasp search` finds, their codes in the prompt.
    let photos = data.join("images");
    let store = dir.parent().unwrap().join("store.sqlite");
    let (st, ph) = (store.to_str().unwrap(), photos.to_str().unwrap());
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/core/tiny-clip");
    let tiny = tiny.to_str().unwrap();
    common::ok(&common::clasp(&[
        "index", ph, "-m", tiny, "--store", st, "--json",
    ]));
    let q = "Where is the dog running?";
    let found = common::ok(&common::clasp(&[
        "search",
        q,
        "--store",
        st,
        "--no-index",
        "--dir",
        ph,
        "-k",
        "2",
        "--json",
    ]));
    let ask = common::ok(&common::clasp(&[
        "ask",
        q,
        "--vlm",
        d,
        "--store",
        st,
        "-k",
        "2",
        "--json",
        "--max-tokens",
        "6",
    ]));
    let paths = |v: &Value| -> Vec<Value> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|h| h["path"].clone())
            .collect()
    };
    assert_eq!(paths(&ask["sources"]), paths(&found));
    assert!(!ask["answer"].as_str().unwrap().trim().is_empty(), "{ask}");
    // Two photos of at least 9216 pixels each: over 2 x 144 code tokens.
    assert!(ask["prompt_tokens"].as_u64().unwrap() > 288, "{ask}");
}
