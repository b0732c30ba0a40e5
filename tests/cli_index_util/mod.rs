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

pub use crate::common::{clasp, ok};

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
