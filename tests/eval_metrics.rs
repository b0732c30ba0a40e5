//! clasp's retrieval and classification metrics against CLIP_benchmark's own
//! functions, on fixtures from `scripts/gen_eval_fixtures.py` (several
//! captions per image, ties, a single-item set, k above the candidate count).

mod common;

use common::f32s;

use clasp::eval::metrics::{classification_metrics, retrieval_ranks, RetrievalMetrics, RECALL_KS};
use serde_json::Value;

fn fixtures() -> Vec<Value> {
    let text = std::fs::read_to_string("tests/fixtures/eval/metrics.json").expect("fixture");
    let v: Value = serde_json::from_str(&text).unwrap();
    v["cases"].as_array().unwrap().clone()
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

#[test]
fn retrieval_metrics_equal_clip_benchmark() {
    let mut n = 0;
    for case in fixtures().iter().filter(|c| c["kind"] == "retrieval") {
        let name = case["name"].as_str().unwrap();
        let scores = f32s(&case["scores"]);
        let cap = usizes(&case["caption_image"]);
        let n_images = case["n_images"].as_u64().unwrap() as usize;
        let exp = &case["expected"];
        let (t2i, i2t) = retrieval_ranks(&scores, n_images, &cap);
        assert_eq!(
            t2i.first,
            usizes(&exp["image_retrieval_first_ranks"]),
            "{name}: text→image ranks"
        );
        assert_eq!(
            i2t.first,
            usizes(&exp["text_retrieval_first_ranks"]),
            "{name}: image→text ranks"
        );
        let m = RetrievalMetrics::from_ranks(&t2i, &i2t, &RECALL_KS);
        for (key, got) in m.to_pairs() {
            let want = exp[&key]
                .as_f64()
                .unwrap_or_else(|| panic!("{name}: no expected {key}"));
            assert!(
                (got - want).abs() <= 1e-9,
                "{name}: {key} = {got}, CLIP_benchmark {want}"
            );
            // CLIP_benchmark's own float32 mean differs only by f32 rounding.
            if let Some(f) = exp.get(format!("{key}_f32")).and_then(Value::as_f64) {
                assert!(
                    (got - f).abs() <= 6e-8,
                    "{name}: {key} = {got}, f32 mean {f}"
                );
            }
        }
        n += 1;
    }
    assert_eq!(n, 5, "all retrieval cases ran");
}

#[test]
fn classification_metrics_equal_clip_benchmark() {
    let mut n = 0;
    for case in fixtures().iter().filter(|c| c["kind"] == "classification") {
        let name = case["name"].as_str().unwrap();
        let logits = f32s(&case["logits"]);
        let targets = usizes(&case["targets"]);
        let n_classes = case["n_classes"].as_u64().unwrap() as usize;
        let exp = &case["expected"];
        let m = classification_metrics(&logits, n_classes, &targets);
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-9;
        assert!(
            close(m.acc1, exp["acc1"].as_f64().unwrap()),
            "{name}: acc1 {}",
            m.acc1
        );
        match exp["acc5"].as_f64() {
            Some(a5) => assert!(close(m.acc5.unwrap(), a5), "{name}: acc5 {:?}", m.acc5),
            None => assert_eq!(m.acc5, None, "{name}"),
        }
        let want = exp["mean_per_class_recall"].as_f64().unwrap();
        assert!(
            close(m.mean_per_class_recall, want),
            "{name}: balanced acc {} vs {want}",
            m.mean_per_class_recall
        );
        // The argmax predictions behind the confusion matrix are torch's.
        let pred = usizes(&exp["pred"]);
        let mut confusion = vec![vec![0usize; n_classes]; n_classes];
        for (t, p) in targets.iter().zip(&pred) {
            confusion[*t][*p] += 1;
        }
        assert_eq!(m.confusion, confusion, "{name}: confusion");
        n += 1;
    }
    assert_eq!(n, 3, "all classification cases ran");
}
