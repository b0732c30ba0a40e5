//! A BLIP-2 retrieval folder as the model of `clasp index` and `clasp search`:
//! the store keeps each image's query embeddings and a text scores an image
//! by the best query, which must equal transformers'
//! `Blip2ForImageTextRetrieval(use_image_text_matching_head=False)` on the
//! same pairs (scripts/gen_blip2_fixtures.py); `--rerank itm` then uses the
//! same folder's ITM head. Both stores: the embedded one and PostgreSQL.

mod common;
mod pg;

use std::path::{Path, PathBuf};

use serde_json::Value;

/// The small BLIP-2 folder, the fixture's two photos in a folder, the three
/// captions, and transformers' ITC [photo][caption] and ITM match
/// probabilities [photo][caption].
struct Setup {
    _tmp: tempfile::TempDir,
    model: PathBuf,
    photos_dir: PathBuf,
    photos: Vec<String>,
    texts: Vec<String>,
    itc: Vec<Vec<f32>>,
    itm: Vec<Vec<f64>>,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("blip2");
    std::fs::create_dir(&model).unwrap();
    common::blip2_small_folder(&model);
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/blip2/small");
    let (exp, meta) = common::expected_with_meta(&src.join("expected.safetensors"));
    let photos: Vec<String> = serde_json::from_str(&meta["photos"]).unwrap();
    let texts: Vec<String> = serde_json::from_str(&meta["texts"]).unwrap();
    let flickr = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/flickr8k/images");
    let photos_dir = tmp.path().join("photos");
    std::fs::create_dir(&photos_dir).unwrap();
    for p in &photos {
        std::fs::copy(flickr.join(p), photos_dir.join(p)).unwrap();
    }
    let itm: Vec<Vec<Vec<f32>>> = exp["itm"].to_vec3().unwrap();
    let itm = itm
        .iter()
        .map(|per_text| {
            per_text
                .iter()
                .map(|l| 1.0 / (1.0 + ((l[0] - l[1]) as f64).exp()))
                .collect()
        })
        .collect();
    Setup {
        model,
        photos_dir,
        photos,
        texts,
        itc: exp["itc"].to_vec2().unwrap(),
        itm,
        _tmp: tmp,
    }
}

/// Each hit's photo index and score (and ITM probability when re-ranked).
fn hits(s: &Setup, v: &Value) -> Vec<(usize, f64, Option<f64>)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|h| {
            let name = Path::new(h["path"].as_str().unwrap())
                .file_name()
                .unwrap()
                .to_string_lossy()
                .to_string();
            let i = s.photos.iter().position(|p| *p == name).unwrap();
            (i, h["score"].as_f64().unwrap(), h["itm"].as_f64())
        })
        .collect()
}

/// Indexes the photos with the BLIP-2 folder into `store`, then checks every
/// caption's search against transformers' ITC, and the re-ranked search
/// against its ITM.
fn index_and_search(s: &Setup, store: &str) {
    let model = s.model.to_str().unwrap();
    let dir = s.photos_dir.to_str().unwrap();
    let sum = common::ok(&common::clasp(&[
        "index", dir, "-m", model, "--store", store, "--json", "--check",
    ]));
    assert_eq!(sum["added"], 2, "{sum}");
    let search = |text: &str, extra: &[&str]| {
        let mut args = vec![
            "search",
            text,
            "-m",
            model,
            "--store",
            store,
            "--dir",
            dir,
            "--no-index",
            "-k",
            "2",
            "--json",
        ];
        args.extend(extra);
        common::ok(&common::clasp(&args))
    };
    let mut worst = 0f64;
    for (j, text) in s.texts.iter().enumerate() {
        let got = hits(s, &search(text, &[]));
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].1 >= got[1].1, "not ordered: {got:?}");
        for (i, score, _) in &got {
            let want = s.itc[*i][j] as f64;
            worst = worst.max((score - want).abs());
            assert!(
                (score - want).abs() < 1e-4,
                "caption {j}, photo {i}: {score} vs transformers' {want}"
            );
        }
    }
    // The folder's own ITM head re-ranks, without --rerank-model.
    let got = hits(s, &search(&s.texts[0], &["--rerank", "itm:2"]));
    for (i, _, itm) in &got {
        let itm = itm.expect("a re-ranked hit has its ITM probability");
        assert!((itm - s.itm[*i][0]).abs() < 1e-4, "photo {i}: ITM {itm}");
    }
    assert!(got[0].2 >= got[1].2, "not ordered by ITM: {got:?}");
    eprintln!("{store}: ITC within {worst:e} of transformers");
}

#[test]
fn a_blip2_folder_indexes_query_embeddings_and_searches_by_its_itc() {
    let s = setup();
    let store = s.photos_dir.parent().unwrap().join("s.sqlite");
    let store = store.to_str().unwrap();
    index_and_search(&s, store);

    // What BLIP-2's ITC cannot answer is refused by name.
    let model = s.model.to_str().unwrap();
    let dir = s.photos_dir.to_str().unwrap();
    let photo = s.photos_dir.join(&s.photos[0]);
    let refused = |args: &[&str], needle: &str| {
        let out = common::clasp(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(needle), "{err}");
    };
    refused(
        &[
            "search",
            photo.to_str().unwrap(),
            "-m",
            model,
            "--store",
            store,
            "--dir",
            dir,
            "--no-index",
        ],
        "dual encoder",
    );
    refused(
        &[
            "classify",
            dir,
            "--labels",
            "dog,cat",
            "-m",
            model,
            "--store",
            store,
            "--no-index",
        ],
        "dual encoder",
    );
    refused(
        &[
            "index",
            dir,
            "-m",
            model,
            "--store",
            store,
            "--precision",
            "int8",
        ],
        "f32",
    );
    // A dual encoder with --rerank and no fusion model is refused by name
    // before anything loads.
    refused(
        &[
            "search",
            &s.texts[0],
            "-m",
            &common::tiny(),
            "--store",
            store,
            "--dir",
            dir,
            "--no-index",
            "--rerank",
            "itm",
        ],
        "--rerank-model",
    );
}

#[test]
fn a_blip2_folder_searches_postgres_by_the_best_query() {
    let s = setup();
    let pg = pg::Pg::start(55573);
    index_and_search(&s, &pg.url());
}
