//! `clasp prefs` on COCO-mini: every pair's chosen answer is a reference of
//! its photo; a swapped answer mentions an object the photo lacks (by its
//! annotations and references, read here independently) and differs from
//! the reference in that one place; another photo's caption is another
//! photo's; and `train --task dpo` reads the file back without complaint.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use clasp::data::objects::{coco_instances, ObjectWords};
use serde_json::Value;

#[test]
fn prefs_pairs_reference_captions_against_hallucinated_ones() {
    let ann =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/coco-mini-train/annotations");
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("prefs.jsonl");
    let data = format!("coco:{}", ann.join("captions_train2017.json").display());
    let o = Command::new(env!("CARGO_BIN_EXE_clasp"))
        .args([
            "prefs",
            "-d",
            &data,
            "--mode",
            "swap,other",
            "--per-image",
            "2",
            "-o",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    // The photos' references and objects, from COCO's files.
    let caps: Value = serde_json::from_str(
        &std::fs::read_to_string(ann.join("captions_train2017.json")).unwrap(),
    )
    .unwrap();
    let files: BTreeMap<u64, String> = caps["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["id"].as_u64().unwrap(),
                i["file_name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let mut refs: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for a in caps["annotations"].as_array().unwrap() {
        refs.entry(files[&a["image_id"].as_u64().unwrap()].clone())
            .or_default()
            .push(a["caption"].as_str().unwrap().trim().to_string());
    }
    let inst = coco_instances(&ann.join("instances_train2017.json")).unwrap();
    let words = ObjectWords::coco();
    let objects = |f: &str| -> BTreeSet<String> {
        let mut o = inst.get(f).cloned().unwrap_or_default();
        o.extend(words.objects_of(refs[f].iter().map(String::as_str)));
        o
    };
    let (mut swaps, mut others) = (0, 0);
    for line in std::fs::read_to_string(&out).unwrap().lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let img = v["images"][0].as_str().unwrap();
        assert!(Path::new(img).is_file(), "{img}");
        let f = Path::new(img).file_name().unwrap().to_str().unwrap();
        let chosen = v["chosen"][0]["content"].as_str().unwrap();
        let rejected = v["rejected"][0]["content"].as_str().unwrap();
        assert!(refs[f].iter().any(|r| r == chosen), "{chosen}");
        assert_ne!(chosen, rejected);
        if refs
            .iter()
            .any(|(g, rs)| g != f && rs.iter().any(|r| r == rejected))
        {
            others += 1;
            continue;
        }
        // A swap: one word (or two) replaced, and an absent object mentioned.
        swaps += 1;
        let (a, b): (Vec<&str>, Vec<&str>) =
            (chosen.split(' ').collect(), rejected.split(' ').collect());
        let same = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
        let same_end = a
            .iter()
            .rev()
            .zip(b.iter().rev())
            .take_while(|(x, y)| x == y)
            .count();
        assert!(
            a.len() - same - same_end.min(a.len() - same) <= 2,
            "{chosen} -> {rejected}"
        );
        let present = objects(f);
        assert!(
            words
                .mentions(rejected)
                .iter()
                .any(|m| !present.contains(&m.object)),
            "{rejected}: no absent object (photo holds {present:?})"
        );
    }
    assert!(swaps > 50 && others > 50, "swaps {swaps}, others {others}");
    let set = clasp::train::prefs::load_prefs(&out).unwrap();
    assert!(set.issues.is_empty(), "{:?}", set.issues);
    assert_eq!(set.pairs.len(), swaps + others);
}
