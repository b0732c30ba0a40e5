//! Helpers the `cli_index` tests share (split into two files by size).
#![allow(dead_code, unused_imports)]

use clasp::index::Catalog;
use serde_json::Value;
use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn core() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/core")
}
pub fn flickr_images() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/flickr8k/images")
}
pub fn tiny() -> String {
    core().join("tiny-clip").display().to_string()
}

pub fn clasp(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_clasp"))
        .args(args)
        .output()
        .expect("run clasp")
}

pub fn ok(o: &Output) -> Value {
    assert!(
        o.status.success(),
        "clasp failed ({:?}):\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&o.stdout)))
}

/// Copies the first `n` Flickr8k photos (sorted) into `dir`.
pub fn photos(dir: &Path, n: usize) -> Vec<PathBuf> {
    crate::common::flickr_photos(dir, 0..n)
}

pub fn image_files(dir: &Path) -> BTreeSet<String> {
    walkdir::WalkDir::new(dir.canonicalize().unwrap())
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .map(|e| e.path().display().to_string())
        .collect()
}

pub fn store_files(store: &Path) -> BTreeSet<String> {
    Catalog::open(store)
        .unwrap()
        .files_under(&[])
        .unwrap()
        .into_iter()
        .map(|f| f.path)
        .collect()
}

pub fn index(dir: &Path, store: &Path) -> Value {
    ok(&clasp(&[
        "index",
        dir.to_str().unwrap(),
        "-m",
        &tiny(),
        "--store",
        store.to_str().unwrap(),
        "--json",
        "--check",
    ]))
}
