//! End-to-end tests of `clasp eval`: malformed data, the embedding cache,
//! wiring checked against a brute-force computation from `clasp embed`, and
//! the real Flickr8k dev split in ../shared.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

mod common;

fn core() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/core")
}

fn shared() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data")
}

fn clasp(args: &[&str], cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_clasp"))
        .args(args)
        .env("CLASP_CACHE_DIR", cache)
        .output()
        .expect("run clasp")
}

fn tiny() -> String {
    core().join("tiny-clip").display().to_string()
}

fn json_of(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

const IMAGES: [&str; 6] = [
    "rgb.png",
    "rgb.jpg",
    "gray.png",
    "palette.png",
    "exif6.jpg",
    "cmyk.jpg",
];

/// A Flickr8k-layout copy of six fixture images with two captions each.
fn make_flickr(dir: &Path) {
    std::fs::create_dir_all(dir.join("images")).unwrap();
    for f in IMAGES {
        std::fs::copy(core().join("images").join(f), dir.join("images").join(f)).unwrap();
    }
    let list: String = IMAGES.iter().map(|f| format!("{f}\n")).collect();
    std::fs::write(dir.join("Flickr_8k.devImages.txt"), list).unwrap();
    let mut tok = String::new();
    for (i, f) in IMAGES.iter().enumerate() {
        tok.push_str(&format!(
            "{f}#0\ta photo number {i}\n{f}#1\tpicture {i} of a thing\n"
        ));
    }
    std::fs::write(dir.join("Flickr8k.token.txt"), tok).unwrap();
}

#[test]
fn malformed_records_are_reported_with_file_and_line_and_the_rest_is_evaluated() {
    let d = tempfile::tempdir().unwrap();
    let ds = d.path().join("f8k");
    make_flickr(&ds);
    // Break things: a missing image, a duplicate id, a caption of an absent
    // image, a malformed line, a corrupt image, and an empty test split.
    let mut list = std::fs::read_to_string(ds.join("Flickr_8k.devImages.txt")).unwrap();
    list.push_str("gone.jpg\nrgb.png\ncorrupt.jpg\n");
    std::fs::write(ds.join("Flickr_8k.devImages.txt"), list).unwrap();
    std::fs::copy(
        core().join("images/truncated.jpg"),
        ds.join("images/corrupt.jpg"),
    )
    .unwrap();
    let mut tok = std::fs::read_to_string(ds.join("Flickr8k.token.txt")).unwrap();
    tok.push_str("gone.jpg#0\tnothing here\nghost.jpg#0\tno such image\nthis line is broken\ncorrupt.jpg#0\tbad bytes\n");
    std::fs::write(ds.join("Flickr8k.token.txt"), tok).unwrap();
    std::fs::write(ds.join("Flickr_8k.testImages.txt"), "").unwrap();

    let spec = format!("flickr8k:{}", ds.display());
    let o = clasp(
        &[
            "eval",
            "retrieval",
            "-m",
            &tiny(),
            "-d",
            &spec,
            "--split",
            "all",
            "--json",
            "--no-cache",
        ],
        d.path(),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(1),
        "dropped items exit 1; stderr:\n{err}"
    );
    let j = json_of(&o);
    assert_eq!(j["n_images"], 6, "{j}");
    assert_eq!(j["n_texts"], 12, "{j}");
    assert_eq!(j["dropped_images"], 2, "gone.jpg and corrupt.jpg: {j}");
    // gone's, corrupt's and ghost's captions and the broken line.
    assert_eq!(j["dropped_captions"], 4, "{j}");
    for needle in [
        "Flickr_8k.devImages.txt:7: missing image file",
        "Flickr_8k.devImages.txt:8: duplicate image id `rgb.png`",
        "Flickr8k.token.txt:14: caption for image `ghost.jpg`, which is absent",
        "Flickr8k.token.txt:15: malformed caption line",
        "corrupt.jpg",
        "Flickr_8k.testImages.txt:1: split `test` is empty",
        "dropped 2 image(s) and 4 caption(s)",
    ] {
        assert!(err.contains(needle), "missing `{needle}` in stderr:\n{err}");
    }
}

#[test]
fn bad_json_lines_and_empty_split_are_named() {
    let d = tempfile::tempdir().unwrap();
    for f in ["rgb.png", "gray.png"] {
        std::fs::copy(core().join("images").join(f), d.path().join(f)).unwrap();
    }
    let p = d.path().join("pairs.jsonl");
    std::fs::write(
        &p,
        "{\"image\": \"rgb.png\", \"caption\": \"red\"}\n{\"image\": \"gray.png\", \"caption\": \n{\"image\": \"gray.png\", \"caption\": \"gray\"}\n",
    )
    .unwrap();
    let o = clasp(
        &[
            "eval",
            "retrieval",
            "-m",
            &tiny(),
            "-d",
            p.to_str().unwrap(),
            "--json",
            "--no-cache",
        ],
        d.path(),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("pairs.jsonl:2: bad JSON line"), "{err}");
    assert_eq!(json_of(&o)["n_texts"], 2);

    let ds = d.path().join("f8k");
    make_flickr(&ds);
    std::fs::write(ds.join("Flickr_8k.devImages.txt"), "\n").unwrap();
    let spec = format!("flickr8k:{}", ds.display());
    let o = clasp(
        &[
            "eval",
            "retrieval",
            "-m",
            &tiny(),
            "-d",
            &spec,
            "--split",
            "dev",
            "--no-cache",
        ],
        d.path(),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("Flickr_8k.devImages.txt:1: split `dev` is empty"),
        "{err}"
    );
}

fn read_jsonl(p: &Path) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let e = common::read_embed_jsonl(p);
    (e.image_vectors(), e.texts)
}

#[test]
fn recall_matches_brute_force_over_clasp_embed_output() {
    let d = tempfile::tempdir().unwrap();
    let ds = d.path().join("f8k");
    make_flickr(&ds);
    let spec = format!("flickr8k:{}", ds.display());
    let o = clasp(
        &[
            "eval",
            "retrieval",
            "-m",
            &tiny(),
            "-d",
            &spec,
            "--split",
            "dev",
            "--json",
            "--no-cache",
        ],
        d.path(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j = json_of(&o);

    // Same images and captions through `clasp embed`, then ranks by brute force.
    let mut args: Vec<String> = vec!["embed".into(), "-m".into(), tiny(), "-o".into()];
    let out = d.path().join("e.jsonl");
    args.push(out.display().to_string());
    let mut captions = Vec::new();
    for (i, f) in IMAGES.iter().enumerate() {
        args.extend([
            "--image".into(),
            ds.join("images").join(f).display().to_string(),
        ]);
        captions.push((format!("a photo number {i}"), i));
        captions.push((format!("picture {i} of a thing"), i));
    }
    for (c, _) in &captions {
        args.extend(["--text".into(), c.clone()]);
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = clasp(&argv, d.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (im, tx) = read_jsonl(&out);
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    // Rank with ties broken by lower index, as documented.
    let rank = |scores: &[f32], p: usize| {
        1 + (0..scores.len())
            .filter(|&j| scores[j] > scores[p] || (scores[j] == scores[p] && j < p))
            .count()
    };
    for k in [1usize, 5, 10] {
        let t2i = captions
            .iter()
            .enumerate()
            .filter(|(t, (_, img))| {
                rank(
                    &im.iter().map(|v| dot(&tx[*t], v)).collect::<Vec<_>>(),
                    *img,
                ) <= k
            })
            .count() as f64
            / captions.len() as f64;
        let i2t = (0..im.len())
            .filter(|&i| {
                let s: Vec<f32> = tx.iter().map(|t| dot(t, &im[i])).collect();
                captions
                    .iter()
                    .enumerate()
                    .any(|(t, (_, img))| *img == i && rank(&s, t) <= k)
            })
            .count() as f64
            / im.len() as f64;
        let got_t2i = j[format!("image_retrieval_recall@{k}")].as_f64().unwrap();
        let got_i2t = j[format!("text_retrieval_recall@{k}")].as_f64().unwrap();
        assert!(
            (got_t2i - t2i).abs() < 1e-12,
            "R@{k} text→image {got_t2i} vs brute force {t2i}"
        );
        assert!(
            (got_i2t - i2t).abs() < 1e-12,
            "R@{k} image→text {got_i2t} vs brute force {i2t}"
        );
    }
}

#[test]
fn cache_hits_on_rerun_and_misses_on_changed_files_or_models() {
    let d = tempfile::tempdir().unwrap();
    let ds = d.path().join("f8k");
    make_flickr(&ds);
    let cache = d.path().join("cache");
    let spec = format!("flickr8k:{}", ds.display());
    let run = |model: &str| {
        let o = clasp(
            &[
                "eval",
                "retrieval",
                "-m",
                model,
                "-d",
                &spec,
                "--split",
                "dev",
                "--json",
            ],
            &cache,
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        json_of(&o)
    };
    let strip = |mut v: Value| {
        let o = v.as_object_mut().unwrap();
        o.remove("seconds");
        o.remove("image_cache_hits");
        v
    };
    let cold = run(&tiny());
    assert_eq!(cold["image_cache_hits"], 0);
    let warm = run(&tiny());
    assert_eq!(warm["image_cache_hits"], 6);
    assert_eq!(
        strip(cold.clone()),
        strip(warm),
        "warm run gives identical metrics"
    );
    // Change one image's bytes: only that one is embedded again.
    std::fs::copy(core().join("images/rgb.webp"), ds.join("images/gray.png")).unwrap();
    assert_eq!(run(&tiny())["image_cache_hits"], 5);
    // A different model (same architecture, other weights) shares nothing.
    let other = d.path().join("model2");
    std::fs::create_dir(&other).unwrap();
    for e in std::fs::read_dir(core().join("tiny-clip"))
        .unwrap()
        .flatten()
    {
        std::fs::copy(e.path(), other.join(e.file_name())).unwrap();
    }
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(other.join("config.json")).unwrap()).unwrap();
    cfg["logit_scale_init_value"] = Value::from(1.0);
    std::fs::write(other.join("config.json"), cfg.to_string()).unwrap();
    assert_eq!(run(other.to_str().unwrap())["image_cache_hits"], 0);
}

#[test]
fn flickr8k_dev_runs_end_to_end_identically_with_zh_captions() {
    let d = tempfile::tempdir().unwrap();
    let spec = format!("flickr8k:{}", shared().join("flickr8k").display());
    let model = core().join("tiny-chinese-clip").display().to_string();
    let run = || {
        let o = clasp(
            &[
                "eval",
                "retrieval",
                "-m",
                &model,
                "-d",
                &spec,
                "--split",
                "dev",
                "--lang",
                "zh",
                "--json",
                "--no-cache",
            ],
            d.path(),
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let mut v = json_of(&o);
        v.as_object_mut().unwrap().remove("seconds");
        v
    };
    let a = run();
    assert_eq!(a["n_images"], 1000);
    assert_eq!(a["n_texts"], 5000);
    assert_eq!(a["dropped_images"], 0);
    for k in [
        "image_retrieval_recall@1",
        "text_retrieval_recall@10",
        "mean_recall",
    ] {
        let v = a[k].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{k} = {v}");
    }
    assert_eq!(a, run(), "two runs give identical results");
}

#[test]
fn zeroshot_with_class_and_template_files_and_report() {
    let d = tempfile::tempdir().unwrap();
    let ds = d.path().join("cls");
    for (class, files) in [
        ("cat", ["rgb.png", "gray.png"]),
        ("dog", ["rgb.jpg", "palette.png"]),
    ] {
        std::fs::create_dir_all(ds.join(class)).unwrap();
        for f in files {
            std::fs::copy(core().join("images").join(f), ds.join(class).join(f)).unwrap();
        }
    }
    std::fs::write(d.path().join("classes.txt"), "cat\ttabby cat\ndog\tpuppy\n").unwrap();
    std::fs::write(
        d.path().join("templates.txt"),
        "a photo of a {}.\n{c} in the wild\n",
    )
    .unwrap();
    let report = d.path().join("rep");
    let o = clasp(
        &[
            "eval",
            "zeroshot",
            "-m",
            &tiny(),
            "-d",
            ds.to_str().unwrap(),
            "--classes",
            d.path().join("classes.txt").to_str().unwrap(),
            "--templates",
            d.path().join("templates.txt").to_str().unwrap(),
            "--json",
            "--report",
            report.to_str().unwrap(),
            "--no-cache",
        ],
        d.path(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j = json_of(&o);
    assert_eq!(j["n_images"], 4);
    assert_eq!(j["n_templates"], 2);
    assert!(j["acc5"].is_null(), "fewer than 5 classes: {j}");
    let per = j["per_class_recall"].as_object().unwrap();
    assert!(
        per.contains_key("tabby cat") && per.contains_key("puppy"),
        "{j}"
    );
    // The predictions, computed here through the library's encoder: each
    // class's vector is the renormalised mean of its templates' unit
    // embeddings (CLIP's zero-shot classifier), each image goes to the class
    // of highest cosine. Accuracy, per-class recall and their mean must be
    // what those predictions give.
    let enc = clasp::Encoder::load(&tiny(), &candle_core::Device::Cpu).unwrap();
    let class_vec = |name: &str| -> Vec<f32> {
        let texts = [
            format!("a photo of a {name}."),
            format!("{name} in the wild"),
        ];
        let e: Vec<Vec<f32>> = enc.embed_texts(&texts).unwrap().to_vec2().unwrap();
        let mean: Vec<f32> = (0..e[0].len()).map(|i| (e[0][i] + e[1][i]) / 2.0).collect();
        let n = mean.iter().map(|x| x * x).sum::<f32>().sqrt();
        mean.iter().map(|x| x / n).collect()
    };
    let names = ["tabby cat", "puppy"];
    let classes: Vec<Vec<f32>> = names.iter().map(|n| class_vec(n)).collect();
    let mut correct = [0usize; 2];
    for (truth, files) in [
        (0, ["rgb.png", "gray.png"]),
        (1, ["rgb.jpg", "palette.png"]),
    ] {
        for f in files {
            let img = clasp::preprocess::load_image(&core().join("images").join(f)).unwrap();
            let v: Vec<f32> = enc
                .embed_images(&[img])
                .unwrap()
                .to_vec2()
                .unwrap()
                .remove(0);
            let s: Vec<f32> = classes
                .iter()
                .map(|c| c.iter().zip(&v).map(|(a, b)| a * b).sum())
                .collect();
            assert!(
                (s[0] - s[1]).abs() > 1e-5,
                "{f}: a near tie ({s:?}) would make the check flaky"
            );
            if (s[1] > s[0]) as usize == truth {
                correct[truth] += 1;
            }
        }
    }
    let recall = [correct[0] as f64 / 2.0, correct[1] as f64 / 2.0];
    assert_eq!(per["tabby cat"].as_f64().unwrap(), recall[0], "{j}");
    assert_eq!(per["puppy"].as_f64().unwrap(), recall[1], "{j}");
    assert_eq!(
        j["acc1"].as_f64().unwrap(),
        (correct[0] + correct[1]) as f64 / 4.0,
        "{j}"
    );
    assert_eq!(
        j["mean_per_class_recall"].as_f64().unwrap(),
        (recall[0] + recall[1]) / 2.0
    );
    let png = std::fs::read(report.join("confusion.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(std::fs::read_to_string(report.join("report.md"))
        .unwrap()
        .contains("tabby cat"));
}

#[test]
fn diagnose_reports_gap_spread_and_synonym_probe() {
    let d = tempfile::tempdir().unwrap();
    let ds = d.path().join("f8k");
    make_flickr(&ds);
    let spec = format!("flickr8k:{}", ds.display());
    let report = d.path().join("rep");
    let o = clasp(
        &[
            "eval",
            "diagnose",
            "-m",
            &tiny(),
            "-d",
            &spec,
            "--split",
            "dev",
            "--json",
            "--report",
            report.to_str().unwrap(),
            "--no-cache",
        ],
        d.path(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j = json_of(&o);
    let gap = j["modality_gap"].as_f64().unwrap();
    assert!(gap > 0.0 && gap <= 2.0, "{j}");
    for k in ["image_mean_pairwise_cosine", "text_mean_pairwise_cosine"] {
        let v = j[k].as_f64().unwrap();
        assert!((-1.0..=1.0).contains(&v), "{k} = {v}");
    }
    let syn = j["synonyms"].as_array().unwrap();
    assert_eq!(syn.len(), 6);
    assert_eq!(syn[0]["a"], "a red apple");
    assert!(report.join("similarity_hist.png").is_file());
}

/// `clasp eval frechet` on MobileNetV2's pooled features: a set against
/// itself is at 0, the distance is symmetric and positive between two
/// disjoint sets of dev photos, and an unreadable file is named while the
/// rest are measured (exit code 1).
#[test]
fn frechet_distance_of_photo_sets_on_mobilenet() {
    let d = tempfile::tempdir().unwrap();
    let tower = common::pretrained("mobilenet_v2");
    let list = std::fs::read_to_string(shared().join("flickr8k/Flickr_8k.devImages.txt")).unwrap();
    let names: Vec<&str> = list.lines().take(24).collect();
    let write = |file: &str, part: &[&str], extra: &str| {
        let p = d.path().join(file);
        let mut text: String = part
            .iter()
            .map(|n| format!("{}\n", shared().join("flickr8k/images").join(n).display()))
            .collect();
        text.push_str(extra);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let (a, b) = (
        write("a.txt", &names[..12], ""),
        write("b.txt", &names[12..], ""),
    );
    let fd = |x: &str, y: &str| -> f64 {
        let o = clasp(
            &[
                "eval",
                "frechet",
                "--real",
                x,
                "--generated",
                y,
                "--tower",
                tower.to_str().unwrap(),
                "--json",
            ],
            d.path(),
        );
        common::ok(&o)["frechet_distance"].as_f64().unwrap()
    };
    let (ab, ba, aa) = (fd(&a, &b), fd(&b, &a), fd(&a, &a));
    assert!(aa.abs() < 1e-6 * ab, "self distance {aa}");
    assert!(ab > 1.0 && (ab - ba).abs() < 1e-6 * ab, "{ab} vs {ba}");
    let bad = write("bad.txt", &names[12..], "/no/such/photo.jpg\n");
    let o = clasp(
        &[
            "eval",
            "frechet",
            "--real",
            &a,
            "--generated",
            &bad,
            "--tower",
            tower.to_str().unwrap(),
            "--json",
        ],
        d.path(),
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/no/such/photo.jpg"));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (v["generated"].as_u64(), v["unreadable"].as_u64()),
        (Some(12), Some(1))
    );
    assert!((v["frechet_distance"].as_f64().unwrap() - ab).abs() < 1e-6 * ab);
}
