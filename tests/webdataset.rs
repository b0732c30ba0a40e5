//! WebDataset shards written by PyPI's `webdataset` package
//! (scripts/wds_shards.py, `ShardWriter`): clasp's `wds:` reader yields the
//! samples the package's own reader yields (keys, image bytes, captions from
//! `txt` or `json`), names a sample with no caption and a truncated shard by
//! shard and key while keeping the rest, and `clasp train` and
//! `clasp eval retrieval` run on the shards, naming the member that is not
//! an image and going on past it.

mod common;

use std::path::{Path, PathBuf};

use base64::Engine;
use clasp::data::{load_pairs, DatasetSpec, Lang, Split};

fn photos() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/flickr8k");
    std::fs::read_to_string(dir.join("Flickr_8k.trainImages.txt"))
        .unwrap()
        .lines()
        .take(10)
        .map(|n| dir.join("images").join(n.trim()).display().to_string())
        .collect()
}

fn shards(d: &Path) -> (PathBuf, serde_json::Value) {
    let out = d.join("wds");
    let p = photos();
    let mut args = vec![out.to_str().unwrap()];
    args.extend(p.iter().map(String::as_str));
    let v = common::python_client("wds_shards.py", &args);
    (out, v)
}

#[test]
fn webdataset_shards_read_as_the_package_reads_them() {
    let d = tempfile::tempdir().unwrap();
    let (dir, py) = shards(d.path());
    let spec = format!("wds:{}/shard-{{000000..000002}}.tar", dir.display());
    let set = load_pairs(
        &DatasetSpec::parse(&spec).unwrap(),
        Split::All,
        Lang::En,
        None,
    )
    .unwrap();
    let key = |id: &str| id.rsplit_once('#').unwrap().1.to_string();
    let ours: std::collections::HashMap<String, (Vec<u8>, String)> = set
        .image_ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let cap = set.captions[set.caption_image.iter().position(|&c| c == i).unwrap()].clone();
            (key(id), (set.images[i].read().unwrap().to_vec(), cap))
        })
        .collect();
    // Every sample the package yields from the two whole shards, except the
    // one without a caption, with the same bytes and caption.
    let mut expected = 0;
    for s in py["samples"].as_array().unwrap() {
        let k = s["key"].as_str().unwrap();
        if s["caption"].is_null() {
            assert!(
                !ours.contains_key(k),
                "{k} has no caption and must be left out"
            );
            continue;
        }
        expected += 1;
        let (bytes, cap) = ours.get(k).unwrap_or_else(|| panic!("{k} is missing"));
        let want = base64::engine::general_purpose::STANDARD
            .decode(s["jpg"].as_str().unwrap())
            .unwrap();
        assert!(bytes == &want, "{k}: image bytes differ");
        assert_eq!(cap, s["caption"].as_str().unwrap(), "{k}");
    }
    assert_eq!(expected, 7);
    // The truncated shard: its whole first sample kept, the cut one and the
    // rest named, by shard.
    let first = &py["truncated_after"][0]
        .as_str()
        .unwrap()
        .replace(".jpg", "");
    assert!(
        ours.contains_key(first.as_str()),
        "{first} of the truncated shard is whole"
    );
    assert_eq!(ours.len(), expected + 1);
    let issues: Vec<String> = set.issues.iter().map(|i| i.to_string()).collect();
    let named = |needle: &[&str]| issues.iter().any(|i| needle.iter().all(|n| i.contains(n)));
    assert!(
        named(&["shard-000001.tar", "no-caption", "no caption"]),
        "{issues:?}"
    );
    assert!(named(&["shard-000002.tar", "truncated"]), "{issues:?}");
}

#[test]
fn train_and_eval_run_on_shards_past_a_member_that_is_not_an_image() {
    let d = tempfile::tempdir().unwrap();
    let (dir, _) = shards(d.path());
    let spec = format!("wds:{}/shard-{{000000..000001}}.tar", dir.display());
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/core/tiny-clip");
    let o = common::clasp(&[
        "eval",
        "retrieval",
        "-m",
        tiny.to_str().unwrap(),
        "-d",
        &spec,
        "--json",
        "--no-cache",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("shard-000000.tar#bad-jpg.jpg"), "{err}");
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {err}"));
    assert!(v["mean_recall"].as_f64().is_some(), "{v}");
    // The same shards through `pipe:` (spooled into the cache once): the
    // same figures; a command that fails is named.
    let eval = |spec: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_clasp"))
            .args([
                "eval",
                "retrieval",
                "-m",
                tiny.to_str().unwrap(),
                "-d",
                spec,
                "--json",
                "--no-cache",
            ])
            .env("CLASP_CACHE_DIR", d.path().join("cache"))
            .output()
            .unwrap()
    };
    let piped = format!(
        "wds:pipe:cat {}/shard-{{000000..000001}}.tar",
        dir.display()
    );
    for _ in 0..2 {
        let o = eval(&piped);
        let p: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(p["mean_recall"], v["mean_recall"]);
    }
    assert_eq!(
        std::fs::read_dir(d.path().join("cache/wds"))
            .unwrap()
            .count(),
        2
    );
    let o = eval("wds:pipe:false{1,2}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("pipe:false1"), "{err}");
    let out = d.path().join("run");
    let o = common::clasp(&[
        "train",
        "--init",
        tiny.to_str().unwrap(),
        "--dataset",
        &spec,
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--output",
        out.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert_eq!(
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        3
    );
}

/// `clasp embed` with the tiny CLIP of `dataset` into `out` in parts of 3.
fn bulk_embed(dataset: &str, out: &Path, extra: &[&str]) -> std::process::Output {
    let tiny = common::tiny();
    let mut args = vec!["embed", "-m", &tiny, "--dataset", dataset];
    args.extend(["--output-dir", out.to_str().unwrap(), "--part-size", "3"]);
    args.extend(extra);
    common::clasp(&args)
}

/// `clasp embed --dataset wds:... --output-dir`: clip-retrieval's layout,
/// split between two workers and resumed without redoing a part; autofaiss
/// (what `clip-retrieval index` runs) indexes it, its rows line up with the
/// metadata, and a row is the embedding `clasp embed` gives the photo's file.
#[test]
fn bulk_embedding_in_clip_retrieval_layout_feeds_autofaiss() {
    let d = tempfile::tempdir().unwrap();
    let (dir, _) = shards(d.path());
    let spec = format!("wds:{}/shard-{{000000..000001}}.tar", dir.display());
    let out = d.path().join("emb");
    let tiny = common::tiny();
    let embed = |worker: &str| bulk_embed(&spec, &out, &["--worker", worker]);
    // Worker 0 of 2 meets the member that is not an image: named, left out.
    let o = embed("0/2");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("bad-jpg"), "{err}");
    assert!(embed("1/2").status.success());
    // Shard 0 holds 4 samples (parts of 3 and 1), shard 1 holds 3 usable
    // ones (no-caption is left out): 3 parts, numbered without padding.
    let names: Vec<String> = std::fs::read_dir(out.join("metadata"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut names = names;
    names.sort();
    assert_eq!(
        names,
        [
            "metadata_0.parquet",
            "metadata_1.parquet",
            "metadata_2.parquet"
        ]
    );
    let again = embed("0/2");
    assert!(String::from_utf8_lossy(&again.stderr).contains("has 0 left"));

    let v = common::python_client(
        "autofaiss_check.py",
        &[
            out.to_str().unwrap(),
            d.path().join("index").to_str().unwrap(),
        ],
    );
    assert_eq!(v["dtype"], "float16");
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 6, "{rows:?}");
    assert_eq!(v["index_top1"], v["numpy_top1"]);
    // The first row is shard 0's first sample, the first photo, named by its
    // sample key as clip-retrieval names WebDataset samples.
    assert_eq!(rows[0][0], "s0000", "{rows:?}");
    let photo = photos()[0].clone();
    let o = common::clasp(&["embed", "-m", &tiny, "--image", &photo]);
    let line: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().next().unwrap()).unwrap();
    let want = common::f32s(&line["embedding"]);
    let got = common::f32s(&v["first_row"]);
    let diff = want
        .iter()
        .zip(&got)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        diff < 2e-3,
        "row 0 differs from the photo's embedding by {diff} (float16)"
    );

    // A query through the index answers what `clasp search` answers on the
    // same photos: for each caption, the index's top row scores, in clasp's
    // own search, within float16's rounding of clasp's best.
    let lib = d.path().join("lib");
    std::fs::create_dir(&lib).unwrap();
    let key_of = |path: &str| {
        path.rsplit('#')
            .next()
            .unwrap()
            .trim_end_matches(".jpg")
            .to_string()
    };
    for r in rows {
        let key = key_of(r[0].as_str().unwrap());
        let i: usize = key[1..].parse().unwrap();
        std::fs::copy(&photos()[i], lib.join(format!("{key}.jpg"))).unwrap();
    }
    let store = d.path().join("s.sqlite");
    let o = common::clasp(&[
        "index",
        lib.to_str().unwrap(),
        "-m",
        &tiny,
        "--store",
        store.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for (j, r) in rows.iter().enumerate() {
        let caption = r[1].as_str().unwrap();
        let o = common::clasp(&[
            "search",
            caption,
            "--dir",
            lib.to_str().unwrap(),
            "--store",
            store.to_str().unwrap(),
            "--no-index",
            "--json",
            "-k",
            "10",
        ]);
        let hits: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let score = |key: &str| {
            hits.as_array()
                .unwrap()
                .iter()
                .find(|h| {
                    h["path"]
                        .as_str()
                        .unwrap()
                        .ends_with(&format!("/{key}.jpg"))
                })
                .map(|h| h["score"].as_f64().unwrap())
                .unwrap()
        };
        let top = v["index_top1"][j].as_u64().unwrap() as usize;
        let theirs = key_of(rows[top][0].as_str().unwrap());
        let best = hits[0]["score"].as_f64().unwrap();
        let worst = hits.as_array().unwrap().last().unwrap()["score"]
            .as_f64()
            .unwrap();
        eprintln!("{caption}: clasp's scores span {:.4}", best - worst);
        assert!(
            best - score(&theirs) <= 2e-3,
            "{caption}: the index answers {theirs} ({}), clasp search {} ({best})",
            score(&theirs),
            hits[0]["path"]
        );
    }
}

/// Bulk embedding reads a WebDataset a shard at a time: a truncated shard
/// gives what it holds, a missing one is named, and the parts (a shard's
/// samples at --part-size) are numbered as the whole set's would be.
#[test]
fn bulk_embedding_goes_shard_by_shard_past_a_missing_and_a_truncated_shard() {
    let d = tempfile::tempdir().unwrap();
    let (dir, _) = shards(d.path());
    // Shards 0 and 1 are whole, 2 is cut in its second sample, 3 is missing.
    let spec = format!("wds:{}/shard-{{000000..000003}}.tar", dir.display());
    let out = d.path().join("emb");
    let o = bulk_embed(&spec, &out, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("shard-000003.tar"), "{err}");
    assert!(err.contains("of 4 shards"), "{err}");
    // Shard 0: parts of 3 and 1; shard 1: 3; shard 2: what precedes the cut.
    let mut names: Vec<String> = std::fs::read_dir(out.join("metadata"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "metadata_0.parquet",
            "metadata_1.parquet",
            "metadata_2.parquet",
            "metadata_3.parquet"
        ],
        "{err}"
    );
}
