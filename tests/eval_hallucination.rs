//! CHAIR against a reference written from the paper's code
//! (`scripts/gen_chair_fixtures.py`): Pattern's singular of every word it
//! met, each COCO-mini image's objects (instances and reference captions),
//! and the mentions, hallucinations and totals of 170 fixed captions, exact.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use clasp::eval::chair::{chair, coco_instances, ObjectWords, Truth};
use clasp::eval::singular::singularize;
use serde_json::Value;

fn fixture() -> Value {
    let text = std::fs::read_to_string("tests/fixtures/eval/chair.json").expect("fixture");
    serde_json::from_str(&text).unwrap()
}

fn coco() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/coco-mini-train/annotations")
}

fn pairs(v: &Value) -> Vec<(String, String)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_str().unwrap().into(), p[1].as_str().unwrap().into()))
        .collect()
}

#[test]
fn singular_matches_pattern_on_every_word() {
    let f = fixture();
    let words = pairs(&f["singular"]);
    assert!(words.len() > 1000);
    let wrong: Vec<_> = words
        .iter()
        .filter(|(w, s)| &singularize(w) != s)
        .map(|(w, s)| format!("{w}: {} (Pattern: {s})", singularize(w)))
        .collect();
    assert!(wrong.is_empty(), "{wrong:?}");
}

/// Each image's objects: its instance annotations and its references' mentions.
fn objects() -> BTreeMap<String, BTreeSet<String>> {
    let mut objects = coco_instances(&coco().join("instances_train2017.json")).unwrap();
    let caps: Value = serde_json::from_str(
        &std::fs::read_to_string(coco().join("captions_train2017.json")).unwrap(),
    )
    .unwrap();
    let files: BTreeMap<u64, String> = caps["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["id"].as_u64().unwrap(), i["file_name"].as_str().unwrap().into()))
        .collect();
    for a in caps["annotations"].as_array().unwrap() {
        let file = &files[&a["image_id"].as_u64().unwrap()];
        let found = ObjectWords::coco().objects_of([a["caption"].as_str().unwrap()]);
        objects.entry(file.clone()).or_default().extend(found);
    }
    objects
}

#[test]
fn chair_equals_the_papers_code() {
    let f = fixture();
    let objects = objects();
    let want: BTreeMap<String, BTreeSet<String>> =
        serde_json::from_value(f["objects"].clone()).unwrap();
    assert_eq!(objects, want);

    let cases = f["cases"].as_array().unwrap();
    let captions: Vec<&str> = cases.iter().map(|c| c["caption"].as_str().unwrap()).collect();
    let truth: Vec<BTreeSet<String>> = cases
        .iter()
        .map(|c| objects[c["image"].as_str().unwrap()].clone())
        .collect();
    let s = chair(&captions, &truth, Truth::InstancesAndReferences);
    for (c, got) in cases.iter().zip(&s.per_caption) {
        let as_pairs = |ms: &[clasp::eval::chair::Mention]| -> Vec<(String, String)> {
            ms.iter().map(|m| (m.word.clone(), m.object.clone())).collect()
        };
        assert_eq!(as_pairs(&got.mentions), pairs(&c["mentions"]), "{}", c["caption"]);
        assert_eq!(as_pairs(&got.hallucinated), pairs(&c["hallucinated"]), "{}", c["caption"]);
    }
    let t = &f["totals"];
    assert_eq!(s.mentions as u64, t["mentions"].as_u64().unwrap());
    assert_eq!(s.hallucinated_mentions as u64, t["hallucinated_mentions"].as_u64().unwrap());
    assert_eq!(s.hallucinated_captions as u64, t["hallucinated_captions"].as_u64().unwrap());
    assert_eq!(s.chair_i, t["chair_i"].as_f64().unwrap());
    assert_eq!(s.chair_s, t["chair_s"].as_f64().unwrap());
    // The cases mix grounded and wrong-photo captions: both outcomes occur.
    assert!(s.hallucinated_captions > 0 && s.hallucinated_captions < s.captions);
}
