//! End-to-end tests of `clasp index` / `search` / `classify` on Flickr8k
//! photos from ../shared with the tiny test model.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use clasp::index::Catalog;
use serde_json::Value;

mod cli_index_util;
mod common;

use cli_index_util::*;

#[test]
fn incremental_index_tracks_adds_changes_renames_and_deletes() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("photos");
    let files = photos(&dir, 30);
    let store = d.path().join("store.sqlite");
    let s = index(&dir, &store);
    assert_eq!(
        (s["added"].as_u64(), s["embedded"].as_u64()),
        (Some(30), Some(30)),
        "{s}"
    );
    assert_eq!(store_files(&store), image_files(&dir));

    // Add one, modify one, rename one, delete one.
    let extra = flickr_images().join("3637013_c675de7705.jpg");
    std::fs::copy(&extra, dir.join("added.jpg")).unwrap();
    std::fs::copy(flickr_images().join("10815824_2997e03d76.jpg"), &files[1]).unwrap();
    std::fs::rename(&files[2], dir.join("renamed.jpg")).unwrap();
    std::fs::remove_file(&files[3]).unwrap();
    let s = index(&dir, &store);
    for (k, v) in [
        ("added", 1),
        ("updated", 1),
        ("moved", 1),
        ("removed", 1),
        ("unchanged", 27),
    ] {
        assert_eq!(s[k].as_u64(), Some(v), "{k}: {s}");
    }
    assert_eq!(
        s["embedded"].as_u64(),
        Some(2),
        "the renamed file is not re-embedded: {s}"
    );
    assert_eq!(
        store_files(&store),
        image_files(&dir),
        "the store matches the folder exactly"
    );

    // A third run changes nothing.
    let s = index(&dir, &store);
    assert_eq!(
        (s["unchanged"].as_u64(), s["embedded"].as_u64()),
        (Some(30), Some(0)),
        "{s}"
    );
}

#[test]
fn search_equals_brute_force_ranking_of_clasp_embed_vectors() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("photos");
    photos(&dir, 40);
    let store = d.path().join("store.sqlite");
    index(&dir, &store);
    let out = d.path().join("e.jsonl");
    let queries = ["a dog runs on the grass", "two children at the beach"];
    let tiny_s = tiny();
    let mut args = vec![
        "embed",
        "-m",
        &tiny_s,
        "--images-from",
        dir.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    for q in &queries {
        args.extend(["--text", q]);
    }
    let o = clasp(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let common::EmbedOutput { images, texts } = common::read_embed_jsonl(&out);
    for (q, qv) in queries.iter().zip(&texts) {
        let mut brute: Vec<(String, f32)> = images
            .iter()
            .map(|(p, v)| {
                let canon = Path::new(p).canonicalize().unwrap().display().to_string();
                (canon, v.iter().zip(qv).map(|(a, b)| a * b).sum())
            })
            .collect();
        brute.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let hits = ok(&clasp(&[
            "search",
            q,
            "-k",
            "10",
            "--store",
            store.to_str().unwrap(),
            "--dir",
            dir.to_str().unwrap(),
            "--model",
            &tiny(),
            "--json",
            "--no-index",
        ]));
        let hits = hits.as_array().unwrap();
        assert_eq!(hits.len(), 10);
        for (h, (p, s)) in hits.iter().zip(&brute) {
            assert_eq!(h["path"].as_str().unwrap(), p, "query {q}: order differs");
            assert!(
                (h["score"].as_f64().unwrap() - *s as f64).abs() < 1e-5,
                "query {q}: score"
            );
        }
    }
    // The HNSW engine (forced on with a threshold of 1) finds the same top 5
    // on a store this small, and reports its measured recall.
    let exact = ok(&clasp(&[
        "search",
        queries[0],
        "-k",
        "5",
        "--store",
        store.to_str().unwrap(),
        "--dir",
        dir.to_str().unwrap(),
        "--json",
        "--no-index",
    ]));
    let o = clasp(&[
        "-v",
        "search",
        queries[0],
        "-k",
        "5",
        "--store",
        store.to_str().unwrap(),
        "--dir",
        dir.to_str().unwrap(),
        "--json",
        "--no-index",
        "--ann-threshold",
        "1",
    ]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        err.contains("built the HNSW index") && err.contains("recall_at_10"),
        "{err}"
    );
    let ann = ok(&o);
    let paths = |v: &Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|h| h["path"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(paths(&ann), paths(&exact));
    // Algebra: "a" + "b" is the normalised sum of the two query vectors.
    let hits = ok(&clasp(&[
        "search",
        queries[0],
        "+",
        queries[1],
        "-k",
        "3",
        "--store",
        store.to_str().unwrap(),
        "--dir",
        dir.to_str().unwrap(),
        "--json",
        "--no-index",
    ]));
    let sum: Vec<f32> = texts[0].iter().zip(&texts[1]).map(|(a, b)| a + b).collect();
    let n = sum.iter().map(|x| x * x).sum::<f32>().sqrt();
    let mut brute: Vec<(String, f32)> = images
        .iter()
        .map(|(p, v)| {
            (
                Path::new(p).canonicalize().unwrap().display().to_string(),
                v.iter().zip(&sum).map(|(a, b)| a * b / n).sum(),
            )
        })
        .collect();
    brute.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let got: Vec<&str> = hits
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["path"].as_str().unwrap())
        .collect();
    let want: Vec<&str> = brute.iter().take(3).map(|b| b.0.as_str()).collect();
    assert_eq!(got, want);
}

#[test]
fn bad_files_are_skipped_and_listed_never_abort() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("photos");
    photos(&dir, 5);
    for f in ["truncated.jpg", "zero.jpg", "not-an-image.png"] {
        std::fs::copy(core().join("images").join(f), dir.join(f)).unwrap();
    }
    std::fs::write(dir.join("phone.heic"), b"not supported").unwrap();
    std::fs::copy(
        flickr_images().join("3637013_c675de7705.jpg"),
        dir.join("secret.jpg"),
    )
    .unwrap();
    std::fs::set_permissions(
        dir.join("secret.jpg"),
        std::fs::Permissions::from_mode(0o000),
    )
    .unwrap();
    std::os::unix::fs::symlink(dir.join("gone.jpg"), dir.join("dangling.jpg")).unwrap();
    std::fs::create_dir(dir.join("sub")).unwrap();
    std::os::unix::fs::symlink(&dir, dir.join("sub/loop")).unwrap();
    let store = d.path().join("s.sqlite");
    // Root ignores file modes, so run as `nobody` to meet a real EACCES.
    let root = common::running_as_root();
    for p in [d.path(), &dir, &dir.join("sub")] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    // A copy of the model that `nobody` can read.
    let model = d.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for e in std::fs::read_dir(core().join("tiny-clip"))
        .unwrap()
        .flatten()
    {
        std::fs::copy(e.path(), model.join(e.file_name())).unwrap();
        std::fs::set_permissions(
            model.join(e.file_name()),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
    }
    std::fs::set_permissions(&model, std::fs::Permissions::from_mode(0o755)).unwrap();
    // And a copy of the binary: the checkout may sit where `nobody` cannot
    // reach (e.g. under /root).
    let bin = d.path().join("clasp");
    std::fs::copy(env!("CARGO_BIN_EXE_clasp"), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let args = [
        "index",
        dir.to_str().unwrap(),
        "-m",
        model.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
        "--json",
    ];
    let o = if root {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&bin)
            .args(args)
            .env("HOME", d.path())
            .output()
            .unwrap()
    } else {
        Command::new(&bin).args(args).output().unwrap()
    };
    assert_eq!(
        o.status.code(),
        Some(1),
        "partial failure exits 1: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let s: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["added"].as_u64(), Some(5), "{s}");
    let listed = |key: &str| -> Vec<(String, String)> {
        s[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| {
                (
                    x[0].as_str().unwrap().to_string(),
                    x[1].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let failed = listed("failed");
    let skipped = listed("skipped");
    let reason = |list: &[(String, String)], name: &str| {
        list.iter()
            .find(|(p, _)| p.ends_with(name))
            .map(|(_, r)| r.to_lowercase())
            .unwrap_or_else(|| panic!("{name} not listed: {s}"))
    };
    assert!(reason(&failed, "truncated.jpg").contains("truncated"));
    assert!(reason(&failed, "zero.jpg").contains("empty file"));
    assert!(reason(&failed, "not-an-image.png").contains("not a decodable image"));
    assert!(reason(&failed, "secret.jpg").contains("permission denied"));
    assert!(reason(&skipped, "phone.heic").contains("unsupported"));
    assert!(reason(&skipped, "dangling.jpg").contains("broken symlink"));
    assert!(reason(&skipped, "sub/loop").contains("loop"));
}

#[test]
fn sigkill_mid_run_leaves_a_consistent_store_that_the_next_run_completes() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("photos");
    photos(&dir, 1500);
    let store = d.path().join("s.sqlite");
    let mut child = Command::new(env!("CARGO_BIN_EXE_clasp"))
        .args([
            "index",
            dir.to_str().unwrap(),
            "-m",
            &tiny(),
            "--store",
            store.to_str().unwrap(),
            "--batch-size",
            "1",
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once some batches have committed.
    let t0 = std::time::Instant::now();
    let mut committed = 0;
    while t0.elapsed().as_secs() < 60 {
        if let Ok(c) = Catalog::open(&store) {
            committed = c.files_under(&[]).map(|f| f.len()).unwrap_or(0);
            if committed >= 50 {
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "the run was killed before it finished ({committed} committed)"
    );
    let c = Catalog::open(&store).unwrap();
    assert_eq!(
        c.check(None).unwrap(),
        Vec::<String>::new(),
        "consistent after SIGKILL"
    );
    let before = c.files_under(&[]).unwrap().len();
    assert!(
        (50..1500).contains(&before),
        "killed halfway: {before} files committed"
    );
    drop(c);
    let s = index(&dir, &store); // --check verifies vectors for every file
    assert_eq!(
        s["embedded"].as_u64(),
        Some((1500 - before) as u64),
        "resumed, committed work kept: {s}"
    );
    assert_eq!(store_files(&store), image_files(&dir));
}
