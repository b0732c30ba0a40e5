//! `clasp classify`, hybrid search and the store's edge cases, as a user runs them.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

mod cli_index_util;
mod common;

use cli_index_util::*;

#[test]
fn classify_equals_an_independent_argmax_over_clasp_embed_vectors() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("photos");
    let files = photos(&dir, 6);
    let store = d.path().join("s.sqlite");
    // One template, so each label's class vector is its one prompt's embedding.
    let templates = d.path().join("templates.txt");
    std::fs::write(&templates, "a photo of a {}.\n").unwrap();
    let labels = ["dog", "cat", "person"];
    let v = ok(&clasp(&[
        "classify",
        dir.to_str().unwrap(),
        "--labels",
        "dog,cat,person",
        "--templates",
        templates.to_str().unwrap(),
        "-m",
        &tiny(),
        "--store",
        store.to_str().unwrap(),
        "--json",
    ]));
    let got = v.as_array().unwrap();
    assert_eq!(got.len(), 6);

    // The expectation from `clasp embed`'s vectors: softmax(100 * cos) over
    // the three prompts, computed here.
    let out = d.path().join("e.jsonl");
    let mut args = vec![
        "embed".to_string(),
        "-m".into(),
        tiny(),
        "-o".into(),
        out.display().to_string(),
    ];
    for f in &files {
        args.extend(["--image".into(), f.display().to_string()]);
    }
    for l in labels {
        args.extend(["--text".into(), format!("a photo of a {l}.")]);
    }
    let o = Command::new(env!("CARGO_BIN_EXE_clasp"))
        .args(&args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: Vec<Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let vecs = |ty: &str| -> Vec<(String, Vec<f64>)> {
        rows.iter()
            .filter(|r| r["type"] == ty)
            .map(|r| {
                let e = r["embedding"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect();
                (r["input"].as_str().unwrap().to_string(), e)
            })
            .collect()
    };
    let texts = vecs("text");
    assert_eq!(texts.len(), 3);
    for (path, img) in vecs("image") {
        let logits: Vec<f64> = texts
            .iter()
            .map(|(_, t)| 100.0 * img.iter().zip(t).map(|(a, b)| a * b).sum::<f64>())
            .collect();
        let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = logits.iter().map(|l| (l - max).exp()).sum();
        let best = (0..3)
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(b.cmp(&a)))
            .unwrap();
        let name = Path::new(&path)
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let row = got
            .iter()
            .find(|l| l["path"].as_str().unwrap().ends_with(&name))
            .unwrap_or_else(|| panic!("{name} not classified"));
        assert_eq!(row["label"], labels[best], "{name}");
        let p = row["probability"].as_f64().unwrap();
        assert!((p - 1.0 / z).abs() < 1e-4, "{name}: {p} vs {}", 1.0 / z);
    }
}

#[test]
fn hybrid_search_finds_sidecar_captions() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("photos");
    let files = photos(&dir, 12);
    // A sidecar caption with a rare word: BM25 must surface that file.
    std::fs::write(
        format!("{}.txt", files[7].display()),
        "a zebra crossing the savanna",
    )
    .unwrap();
    let store = d.path().join("s.sqlite");
    let hits = ok(&clasp(&[
        "search",
        "zebra",
        "--hybrid",
        "-k",
        "3",
        "-m",
        &tiny(),
        "--store",
        store.to_str().unwrap(),
        "--dir",
        dir.to_str().unwrap(),
        "--json",
    ]));
    let hits = hits.as_array().unwrap();
    let top = hits[0]["path"].as_str().unwrap();
    assert_eq!(
        top,
        files[7].canonicalize().unwrap().display().to_string(),
        "{hits:?}"
    );
}

/// First contact: a store that does not exist is refused where one is
/// required (not silently created), an empty one answers with no results,
/// a store indexed with a relative model path is searched from elsewhere,
/// and errors say their cause once.
#[test]
fn missing_stores_are_refused_empty_ones_answer_and_the_model_path_is_absolute() {
    let d = tempfile::tempdir().unwrap();
    let missing = d.path().join("typo").join("store.sqlite");
    let o = clasp(&[
        "search",
        "a dog",
        "--no-index",
        "--store",
        missing.to_str().unwrap(),
        "-m",
        &tiny(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no such store"), "{err}");
    assert!(!missing.parent().unwrap().exists(), "nothing was created");
    let o = clasp(&["serve", "-m", &tiny(), "--store", missing.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no such store"));

    // Index from the repository with a relative model path, search from a
    // folder elsewhere with no --model: the store found the model again.
    let pics = d.path().join("pics");
    photos(&pics, 3);
    let store = d.path().join("store.sqlite");
    let o = Command::new(env!("CARGO_BIN_EXE_clasp"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "index",
            pics.to_str().unwrap(),
            "-m",
            "tests/fixtures/core/tiny-clip",
        ])
        .args(["--store", store.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = Command::new(env!("CARGO_BIN_EXE_clasp"))
        .current_dir(d.path())
        .args([
            "search",
            "a dog",
            "--no-index",
            "--json",
            "--dir",
            pics.to_str().unwrap(),
        ])
        .args(["--store", store.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(ok(&o).as_array().unwrap().len(), 3);

    // A store with nothing under the folder searched: no results, exit 0.
    let empty = d.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let o = clasp(&[
        "search",
        "a dog",
        "--json",
        "--dir",
        empty.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
        "-m",
        &tiny(),
    ]);
    assert_eq!(ok(&o), serde_json::json!([]));

    // An error names its cause once.
    let o = clasp(&["embed", "-m", "/nonexistent/model/dir", "--text", "a"]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success());
    let first = err.lines().next().unwrap_or_default();
    let parts: Vec<&str> = first.split(": ").collect();
    for w in parts.windows(2) {
        assert_ne!(w[0], w[1], "repeated: {first}");
    }
}

/// Checks that need no model come before loading one, and a model that does
/// not load leaves no store behind: `index` and `search` with a wrong model
/// create no store file, `classify` with one label or an empty template file
/// says so without touching the model or the store, and `-q` leaves only
/// errors on stderr.
#[test]
fn cheap_checks_come_first_and_a_wrong_model_leaves_no_store() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("photos");
    photos(&dir, 2);
    let store = d.path().join("sub/s.sqlite");
    let (dir_s, store_s) = (dir.to_str().unwrap(), store.to_str().unwrap());
    let missing = d.path().join("no-such-model");
    let missing = missing.to_str().unwrap();
    for args in [
        vec!["index", dir_s, "-m", missing, "--store", store_s],
        vec![
            "search", "a dog", "--dir", dir_s, "-m", missing, "--store", store_s,
        ],
    ] {
        let o = clasp(&args);
        assert!(!o.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("no-such-model"), "{args:?}: {err}");
        assert!(!store.exists(), "{args:?} left a store behind");
    }
    let o = clasp(&[
        "classify", dir_s, "--labels", "dog", "-m", missing, "--store", store_s,
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("at least two labels"),
        "{err}"
    );
    let empty = d.path().join("templates.txt");
    std::fs::write(&empty, "\n  \n").unwrap();
    let o = clasp(&[
        "classify",
        dir_s,
        "--labels",
        "dog,cat",
        "--templates",
        empty.to_str().unwrap(),
        "-m",
        missing,
        "--store",
        store_s,
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("no templates"), "{err}");
    assert!(!store.exists());
    // With the real model: a summary without -q, nothing on stderr with it.
    let loud = clasp(&["index", dir_s, "-m", &tiny(), "--store", store_s]);
    assert!(loud.status.success());
    assert!(String::from_utf8_lossy(&loud.stderr).contains("unchanged"));
    let quiet = clasp(&["-q", "index", dir_s, "-m", &tiny(), "--store", store_s]);
    assert!(quiet.status.success());
    assert_eq!(String::from_utf8_lossy(&quiet.stderr), "");
}
