//! What the PostgreSQL tests share: a real server per test (started and
//! destroyed by scripts/postgres.sh), and `clasp` run against it.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use clasp::index::{store, ConnectOptions};
use serde_json::Value;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A server for one test; stopped and deleted on drop.
pub struct Pg {
    pub port: u16,
}

impl Pg {
    pub fn start(port: u16) -> Pg {
        let pg = Pg { port };
        // A server left by an aborted earlier run goes first.
        pg.script(&["destroy", &port.to_string()]);
        let o = pg.script(&["start", &port.to_string()]);
        assert!(
            o.status.success(),
            "scripts/postgres.sh start {port} failed:\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        pg
    }

    pub fn script(&self, args: &[&str]) -> Output {
        Command::new(root().join("scripts/postgres.sh"))
            .args(args)
            .output()
            .expect("run scripts/postgres.sh")
    }

    pub fn url(&self) -> String {
        format!("postgres://clasp:clasp@127.0.0.1:{}/clasp", self.port)
    }

    pub fn stop(&self) {
        let o = self.script(&["stop", &self.port.to_string()]);
        assert!(o.status.success(), "stop failed");
    }

    pub fn restart(&self) {
        let o = self.script(&["start", &self.port.to_string()]);
        assert!(o.status.success(), "restart failed");
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let _ = self.script(&["destroy", &self.port.to_string()]);
    }
}

/// Copies Flickr8k photos `range` (sorted by name) into `dir`.
pub fn photos(dir: &Path, range: std::ops::Range<usize>) {
    crate::common::flickr_photos(dir, range);
}

pub use crate::common::{clasp, ok};

pub fn index(dir: &Path, store: &str) -> Value {
    ok(&clasp(&[
        "index",
        dir.to_str().unwrap(),
        "-m",
        &crate::common::tiny(),
        "--store",
        store,
        "--json",
        "--check",
    ]))
}

/// `clasp search QUERY --dir DIR --store STORE --no-index --json -k K EXTRA...`.
pub fn search_output(store: &str, dir: &Path, query: &str, k: usize, extra: &[&str]) -> Output {
    let k = k.to_string();
    let mut args = vec![
        "search",
        query,
        "--dir",
        dir.to_str().unwrap(),
        "--store",
        store,
        "--no-index",
        "--json",
        "-k",
        &k,
    ];
    args.extend_from_slice(extra);
    clasp(&args)
}

/// Search hits as (path, score).
pub fn hits(v: &Value) -> Vec<(String, f64)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["path"].as_str().unwrap().to_string(),
                h["score"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// `clasp search --json` over `dir`, exact (no HNSW), as (path, score).
pub fn search(store: &str, dir: &Path, query: &str, k: usize) -> Vec<(String, f64)> {
    hits(&ok(&search_output(
        store,
        dir,
        query,
        k,
        &["--ann-threshold", "100000000"],
    )))
}

/// `clasp index DIR -m tiny --store STORE --batch-size B` in the background.
pub fn spawn_index(dir: &Path, store: &str, batch: usize, json: bool) -> std::process::Child {
    let (batch, tiny) = (batch.to_string(), crate::common::tiny());
    let mut args = vec![
        "index",
        dir.to_str().unwrap(),
        "-m",
        &tiny,
        "--store",
        store,
        "--batch-size",
        &batch,
    ];
    if json {
        args.push("--json");
    }
    Command::new(env!("CARGO_BIN_EXE_clasp"))
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until `store` holds at least `n` file rows.
pub fn wait_for_files(store: &str, n: usize) {
    let mut watch = store::open(store, true, &ConnectOptions::default()).unwrap();
    let t0 = std::time::Instant::now();
    while watch.files_under(&[]).map(|f| f.len()).unwrap_or(0) < n {
        assert!(t0.elapsed().as_secs() < 300, "{n} files committed in time");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `clasp store copy FROM TO --json`.
pub fn copy(from: &str, to: &str) -> Value {
    ok(&clasp(&["store", "copy", from, to, "--json"]))
}

/// Same paths in the same order, and the same scores to float rounding.
pub fn assert_same_hits(a: &[(String, f64)], b: &[(String, f64)], what: &str) {
    let pa: Vec<&str> = a.iter().map(|h| h.0.as_str()).collect();
    let pb: Vec<&str> = b.iter().map(|h| h.0.as_str()).collect();
    assert_eq!(pa, pb, "{what}: the same files in the same order");
    for (x, y) in a.iter().zip(b) {
        assert!((x.1 - y.1).abs() < 1e-5, "{what}: {} vs {}", x.1, y.1);
    }
}

pub fn store_files(spec: &str) -> BTreeSet<String> {
    let mut s = store::open(spec, false, &ConnectOptions::default()).unwrap();
    s.files_under(&[])
        .unwrap()
        .into_iter()
        .map(|f| f.path)
        .collect()
}

pub const QUERIES: [&str; 4] = [
    "a dog running on grass",
    "a child in a pink dress",
    "two people at the beach",
    "a man riding a bike",
];
