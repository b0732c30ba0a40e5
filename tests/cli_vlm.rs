//! `clasp assemble`, `clasp caption`, `clasp chat` and `clasp eval caption`
//! as a user runs them: the CLI's captions are the library's, `--json` has
//! the documented shape, an unreadable image is reported and the rest still
//! captioned, and eval's scores equal a rescoring of its own captions.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Device;
use serde_json::Value;

fn run(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_clasp"))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn image(name: &str) -> String {
    root()
        .join("../shared/data/flickr8k/images")
        .join(name)
        .display()
        .to_string()
}

use common::assembled;

#[test]
fn caption_json_equals_the_library_and_a_bad_image_is_reported_not_fatal() {
    let d = tempfile::tempdir().unwrap();
    let model = assembled(d.path());
    let bad = d.path().join("broken.jpg");
    std::fs::write(&bad, b"not a jpeg").unwrap();
    let (a, b) = (
        image("2090545563_a4e66ec76b.jpg"),
        image("3393035454_2d2370ffd4.jpg"),
    );
    let (code, out, err) = run(&[
        "caption",
        "--model",
        &model,
        &a,
        bad.to_str().unwrap(),
        &b,
        "--max-tokens",
        "6",
        "--json",
    ]);
    assert_eq!(code, 1, "one image failed: exit 1\n{err}");
    assert!(err.contains("broken.jpg"), "{err}");
    let rows: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["path"], a.as_str());
    assert_eq!(rows[1]["path"], b.as_str());
    // The same greedy captions as the library's, one image at a time.
    let vlm = clasp::vlm::Vlm::load(Path::new(&model), &Device::Cpu).unwrap();
    let opts = clasp::llm::GenerateOptions {
        max_new_tokens: 6,
        ..Default::default()
    };
    for (row, p) in rows.iter().zip([&a, &b]) {
        let px = vlm.pixels(&[Path::new(p)]).unwrap();
        let g = vlm
            .generate(
                &px,
                &clasp::vlm::Vlm::caption_turn("Describe the image."),
                &opts,
            )
            .unwrap();
        assert_eq!(row["caption"], g[0].text.as_str());
    }
    // chat answers the same question about one image.
    let (code, out, err) = run(&[
        "chat",
        "--model",
        &model,
        "--image",
        &a,
        "--prompt",
        "Describe the image.",
        "--max-tokens",
        "6",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim_end(),
        rows[0]["caption"].as_str().unwrap().trim_end()
    );
    // Two placeholders for one image: refused, naming the count.
    let (code, _, err) = run(&[
        "chat",
        "--model",
        &model,
        "--image",
        &a,
        "--prompt",
        "<image> <image> compare",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("2 <image> placeholders for 1 image"), "{err}");
}

#[test]
fn eval_caption_scores_the_first_dev_photos_captions_against_their_own_references() {
    let d = tempfile::tempdir().unwrap();
    let model = assembled(d.path());
    let report = d.path().join("report");
    let data = format!(
        "flickr8k:{}",
        root().join("../shared/data/flickr8k").display()
    );
    let (code, out, err) = run(&[
        "eval",
        "caption",
        "-m",
        &model,
        "-d",
        &data,
        "--split",
        "dev",
        "--limit",
        "4",
        "--max-tokens",
        "8",
        "--json",
        "--report",
        report.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["images"], 4);
    let e: Value =
        serde_json::from_str(&std::fs::read_to_string(report.join("captions.json")).unwrap())
            .unwrap();
    // The inputs of the scores, obtained without `eval caption`: the first 4
    // dev photos from the split file, their references read from
    // Flickr8k.token.txt here, and their captions from `clasp caption`.
    let f8k = root().join("../shared/data/flickr8k");
    let photos: Vec<String> = std::fs::read_to_string(f8k.join("Flickr_8k.devImages.txt"))
        .unwrap()
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .take(4)
        .collect();
    let tokens = std::fs::read_to_string(f8k.join("Flickr8k.token.txt")).unwrap();
    let refs: Vec<Vec<String>> = photos
        .iter()
        .map(|p| {
            tokens
                .lines()
                .filter_map(|l| l.split_once('\t'))
                .filter(|(k, _)| k.split('#').next() == Some(p.as_str()))
                .map(|(_, c)| c.to_string())
                .collect()
        })
        .collect();
    assert!(refs.iter().all(|r| r.len() == 5), "{refs:?}");
    let paths: Vec<String> = photos
        .iter()
        .map(|p| f8k.join("images").join(p).display().to_string())
        .collect();
    let mut args = vec!["caption", "-m", &model, "--max-tokens", "8", "--json"];
    args.extend(paths.iter().map(String::as_str));
    let (code, out, err) = run(&args);
    assert_eq!(code, 0, "{err}");
    let caps: Vec<String> = serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["caption"].as_str().unwrap().trim().to_string())
        .collect();
    // The report pairs each photo with its caption and its own references.
    let rows = e["captions"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row["caption"].as_str().unwrap(), caps[i], "photo {i}");
        let r: Vec<&str> = row["references"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap())
            .collect();
        assert_eq!(r, refs[i], "photo {i}");
    }
    // Scored (pycocoevalcap-exact, tests/caption_metrics.rs) on those inputs.
    let (own, wrong) = clasp::eval::captioning::score_captions(clasp::data::Lang::En, &caps, &refs);
    let close = |a: &Value, b: f64| (a.as_f64().unwrap() - b).abs() < 1e-12;
    assert!(close(&v["scores"]["cider_d"], own.cider_d));
    assert!(close(&v["scores"]["bleu_1"], own.bleu[0]));
    assert!(close(&v["wrong_photos"]["cider_d"], wrong.cider_d));
    // CHAIR on the same inputs; Flickr8k has no instance annotations, so the
    // objects are the references' (tests/eval_hallucination.rs checks CHAIR).
    let names: Vec<&str> = paths.iter().map(String::as_str).collect();
    let cs: Vec<&str> = caps.iter().map(String::as_str).collect();
    let rs: Vec<&[String]> = refs.iter().map(|r| &r[..]).collect();
    let h = clasp::eval::chair::hallucination(&names, &cs, &rs, None);
    assert_eq!(v["chair"]["truth"], "references");
    assert_eq!(v["chair"]["mentions"], h.own.mentions);
    assert!(close(&v["chair"]["chair_i"], h.own.chair_i));
    assert!(close(
        &v["chair"]["wrong_photos"]["chair_s"],
        h.wrong_photos.chair_s
    ));
    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    assert!(md.contains("grounding control") && md.contains("- **generated:**"));
}

/// Evaluation during training works for a vision-language run as for a dual
/// encoder: `--eval-dataset` captions the first `--eval-limit` dev photos
/// with the saved checkpoint, and the step's `dev` record equals what
/// `clasp eval caption` reports for that checkpoint.
#[test]
fn a_vision_language_run_evaluates_its_captions_during_training() {
    let d = tempfile::tempdir().unwrap();
    let model = assembled(d.path());
    let dir = d.path().join("run");
    let data = format!(
        "flickr8k:{}",
        root().join("../shared/data/flickr8k").display()
    );
    let (code, out, err) = run(&[
        "train",
        "--init",
        &model,
        "--dataset",
        &data,
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--eval-dataset",
        &data,
        "--eval-every",
        "2",
        "--eval-limit",
        "2",
        "--output",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let log = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let last: Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    let dev = &last["dev"];
    assert_eq!(dev["images"], 2, "{last}");
    let printed: Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    assert_eq!(&printed, dev);
    let ckpt = dir.join("checkpoint");
    let (code, out, err) = run(&[
        "eval",
        "caption",
        "-m",
        ckpt.to_str().unwrap(),
        "-d",
        &data,
        "--split",
        "dev",
        "--limit",
        "2",
        "--max-tokens",
        "32",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let e: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(dev["cider_d"], e["scores"]["cider_d"]);
    assert_eq!(dev["wrong_photos_cider_d"], e["wrong_photos"]["cider_d"]);
    assert_eq!(dev["bleu_4"], e["scores"]["bleu_4"]);
    assert!(dir.join("dev_cider.png").is_file());
}

/// `clasp eval pope` on COCO-mini: the questions are POPE's for the images'
/// annotated objects, each answer is what `clasp caption` answers to the same
/// question about the same photo, and the scores are POPE's reading of them.
#[test]
fn eval_pope_asks_the_papers_questions_and_scores_the_models_own_answers() {
    use clasp::eval::pope::{questions, says_yes, score, Negatives};
    let d = tempfile::tempdir().unwrap();
    let model = assembled(d.path());
    let ann = root().join("../shared/data/coco-mini-train/annotations");
    let data = format!("coco:{}", ann.join("captions_train2017.json").display());
    let (code, out, err) = run(&[
        "eval",
        "pope",
        "-m",
        &model,
        "-d",
        &data,
        "--limit",
        "4",
        "--negatives",
        "popular",
        "--max-tokens",
        "4",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert!(v["objects_from"]
        .as_str()
        .unwrap()
        .ends_with("instances_train2017.json"));
    let run0 = &v["runs"][0];
    assert_eq!(run0["negatives"], "popular");
    let answers = run0["answers"].as_array().unwrap();
    // The same questions from the library, on the first 4 images' annotations.
    let set = clasp::data::load_pairs(
        &clasp::data::DatasetSpec::parse(&data).unwrap(),
        clasp::data::Split::Test,
        clasp::data::Lang::En,
        None,
    )
    .unwrap();
    let inst = clasp::eval::chair::coco_instances(&ann.join("instances_train2017.json")).unwrap();
    let objects: Vec<Vec<String>> = set.images[..4]
        .iter()
        .map(|s| {
            let f = s.path().file_name().unwrap().to_string_lossy().to_string();
            inst[&f].iter().cloned().collect()
        })
        .collect();
    let refs: Vec<&[String]> = objects.iter().map(|o| &o[..]).collect();
    let qs = questions(&refs, 3, Negatives::Popular, &mut clasp::rng::Rng(0));
    assert!(!qs.is_empty());
    assert_eq!(answers.len(), qs.len());
    for (a, q) in answers.iter().zip(&qs) {
        assert_eq!(a["object"], q.object.as_str());
        assert_eq!(a["present"], q.present);
        assert_eq!(a["yes"], says_yes(a["answer"].as_str().unwrap()));
    }
    // The first question's answer is `clasp caption`'s answer to it.
    let q = &qs[0];
    let photo = set.images[q.image].path().display().to_string();
    let (code, out, err) = run(&[
        "caption",
        "-m",
        &model,
        "--max-tokens",
        "4",
        "--json",
        "--prompt",
        &q.text(),
        &photo,
    ]);
    assert_eq!(code, 0, "{err}");
    let c: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        answers[0]["answer"],
        c[0]["caption"].as_str().unwrap().trim()
    );
    let yes: Vec<bool> = answers
        .iter()
        .map(|a| a["yes"].as_bool().unwrap())
        .collect();
    let labels: Vec<bool> = qs.iter().map(|q| q.present).collect();
    let s = score(&yes, &labels);
    assert_eq!(run0["scores"]["f1"].as_f64().unwrap(), s.f1);
    assert_eq!(run0["scores"]["yes_ratio"].as_f64().unwrap(), s.yes_ratio);
}

/// `clasp eval pope --answer-by logits`: each answer is whichever of "Yes"
/// and "No" the model's next-token logits favour after the question, as the
/// library's own logits of that prompt say.
#[test]
fn eval_pope_by_logits_reads_the_yes_and_no_logits() {
    let d = tempfile::tempdir().unwrap();
    let model = assembled(d.path());
    let ann = root().join("../shared/data/coco-mini-train/annotations");
    let data = format!("coco:{}", ann.join("captions_train2017.json").display());
    let (code, out, err) = run(&[
        "eval",
        "pope",
        "-m",
        &model,
        "-d",
        &data,
        "--limit",
        "3",
        "--negatives",
        "adversarial",
        "--answer-by",
        "logits",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let answers = v["runs"][0]["answers"].as_array().unwrap();
    assert!(!answers.is_empty());
    let vlm = clasp::vlm::Vlm::load(Path::new(&model), &Device::Cpu).unwrap();
    let tok = |w: &str| vlm.tokenizer.encode(w, false).unwrap()[0] as usize;
    for a in answers.iter().take(2) {
        let text = a["answer"].as_str().unwrap();
        assert!(text == "Yes" || text == "No", "{text}");
        assert_eq!(a["yes"], text == "Yes");
        let object = a["object"].as_str().unwrap();
        let q = clasp::eval::pope::Question {
            image: 0,
            object: object.into(),
            present: false,
        };
        let user = clasp::vlm::Vlm::caption_turn(&q.text());
        let ids = vlm.chat_prompt(&user, 1).unwrap();
        let px = vlm
            .pixels(&[Path::new(a["image"].as_str().unwrap())])
            .unwrap();
        let logits: Vec<f32> = vlm
            .logits(&ids, &px)
            .unwrap()
            .get(ids.len() - 1)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(
            text == "Yes",
            logits[tok("Yes")] > logits[tok("No")],
            "{object}"
        );
    }
}
