//! The PostgreSQL store, end to end, against real PostgreSQL 18 + pgvector
//! servers that `scripts/postgres.sh` starts on loopback (one per test, on
//! its own port, destroyed when the test ends, panics included).
//!
//! The embedded SQLite store is the independent expectation: the same
//! photos, the same model, the same queries.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use clasp::index::{store, ConnectOptions};
use serde_json::Value;
use tokio_rustls::rustls::pki_types as rustls_pki;

mod common;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A server for one test; stopped and deleted on drop.
struct Pg {
    port: u16,
}

impl Pg {
    fn start(port: u16) -> Pg {
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

    fn script(&self, args: &[&str]) -> Output {
        Command::new(root().join("scripts/postgres.sh"))
            .args(args)
            .output()
            .expect("run scripts/postgres.sh")
    }

    fn url(&self) -> String {
        format!("postgres://clasp:clasp@127.0.0.1:{}/clasp", self.port)
    }

    fn stop(&self) {
        let o = self.script(&["stop", &self.port.to_string()]);
        assert!(o.status.success(), "stop failed");
    }

    fn restart(&self) {
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
fn photos(dir: &Path, range: std::ops::Range<usize>) {
    common::flickr_photos(dir, range);
}

fn clasp(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_clasp"))
        .args(args)
        .output()
        .expect("run clasp")
}

fn ok(o: &Output) -> Value {
    assert!(
        o.status.success(),
        "clasp failed ({:?}):\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&o.stdout)))
}

fn index(dir: &Path, store: &str) -> Value {
    ok(&clasp(&[
        "index",
        dir.to_str().unwrap(),
        "-m",
        &common::tiny(),
        "--store",
        store,
        "--json",
        "--check",
    ]))
}

/// `clasp search QUERY --dir DIR --store STORE --no-index --json -k K EXTRA...`.
fn search_output(store: &str, dir: &Path, query: &str, k: usize, extra: &[&str]) -> Output {
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
fn hits(v: &Value) -> Vec<(String, f64)> {
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
fn search(store: &str, dir: &Path, query: &str, k: usize) -> Vec<(String, f64)> {
    hits(&ok(&search_output(
        store,
        dir,
        query,
        k,
        &["--ann-threshold", "100000000"],
    )))
}

/// `clasp index DIR -m tiny --store STORE --batch-size B` in the background.
fn spawn_index(dir: &Path, store: &str, batch: usize, json: bool) -> std::process::Child {
    let (batch, tiny) = (batch.to_string(), common::tiny());
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
fn wait_for_files(store: &str, n: usize) {
    let mut watch = store::open(store, true, &ConnectOptions::default()).unwrap();
    let t0 = std::time::Instant::now();
    while watch.files_under(&[]).map(|f| f.len()).unwrap_or(0) < n {
        assert!(t0.elapsed().as_secs() < 300, "{n} files committed in time");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `clasp store copy FROM TO --json`.
fn copy(from: &str, to: &str) -> Value {
    ok(&clasp(&["store", "copy", from, to, "--json"]))
}

/// Same paths in the same order, and the same scores to float rounding.
fn assert_same_hits(a: &[(String, f64)], b: &[(String, f64)], what: &str) {
    let pa: Vec<&str> = a.iter().map(|h| h.0.as_str()).collect();
    let pb: Vec<&str> = b.iter().map(|h| h.0.as_str()).collect();
    assert_eq!(pa, pb, "{what}: the same files in the same order");
    for (x, y) in a.iter().zip(b) {
        assert!((x.1 - y.1).abs() < 1e-5, "{what}: {} vs {}", x.1, y.1);
    }
}

fn store_files(spec: &str) -> BTreeSet<String> {
    let mut s = store::open(spec, false, &ConnectOptions::default()).unwrap();
    s.files_under(&[])
        .unwrap()
        .into_iter()
        .map(|f| f.path)
        .collect()
}

const QUERIES: [&str; 4] = [
    "a dog running on grass",
    "a child in a pink dress",
    "two people at the beach",
    "a man riding a bike",
];

#[test]
fn exact_search_on_postgres_equals_the_embedded_store() {
    let pg = Pg::start(55401);
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("photos");
    photos(&dir, 0..120);
    let sqlite = d.path().join("s.sqlite");
    let s1 = index(&dir, sqlite.to_str().unwrap());
    let s2 = index(&dir, &pg.url());
    assert_eq!(s1["embedded"], 120);
    assert_eq!(s2["embedded"], 120);
    for q in QUERIES {
        let a = search(sqlite.to_str().unwrap(), &dir, q, 20);
        let b = search(&pg.url(), &dir, q, 20);
        assert_eq!(a.len(), 20);
        assert_same_hits(&a, &b, q);
    }
    // A second run finds nothing to do, as on the embedded store.
    let again = index(&dir, &pg.url());
    assert_eq!(
        (again["embedded"].as_u64(), again["unchanged"].as_u64()),
        (Some(0), Some(120))
    );
    // Moves and removals: the vectors follow the content.
    let moved = d.path().join("photos/sub");
    std::fs::create_dir_all(&moved).unwrap();
    let names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .take(10)
        .collect();
    for p in &names[..5] {
        std::fs::rename(p, moved.join(p.file_name().unwrap())).unwrap();
    }
    for p in &names[5..] {
        std::fs::remove_file(p).unwrap();
    }
    let s = index(&dir, &pg.url());
    assert_eq!(
        (
            s["moved"].as_u64(),
            s["removed"].as_u64(),
            s["embedded"].as_u64()
        ),
        (Some(5), Some(5), Some(0)),
        "{s}"
    );
    index(&dir, sqlite.to_str().unwrap());
    assert_eq!(
        store_files(&pg.url()),
        store_files(sqlite.to_str().unwrap())
    );
    for q in QUERIES {
        let a = search(sqlite.to_str().unwrap(), &dir, q, 20);
        let b = search(&pg.url(), &dir, q, 20);
        assert_same_hits(&a, &b, q);
    }
}

#[test]
fn hnsw_search_on_postgres_finds_the_exact_neighbours_at_high_ef() {
    let pg = Pg::start(55402);
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("photos");
    photos(&dir, 0..300);
    index(&dir, &pg.url());
    for q in QUERIES {
        let exact = search(&pg.url(), &dir, q, 10);
        let v = ok(&search_output(
            &pg.url(),
            &dir,
            q,
            10,
            &["--ann-threshold", "1", "--ef-search", "400"],
        ));
        let hnsw: BTreeSet<&str> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["path"].as_str().unwrap())
            .collect();
        let truth: BTreeSet<&str> = exact.iter().map(|h| h.0.as_str()).collect();
        let hit = hnsw.intersection(&truth).count();
        // 300 vectors, ef 400: the graph search visits them all.
        assert_eq!(hit, 10, "{q}: HNSW recall@10 at ef 400 over 300 vectors");
    }
}

#[test]
fn two_writers_on_overlapping_folders_embed_each_content_once() {
    let pg = Pg::start(55403);
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("a");
    let b = d.path().join("b");
    // 100 photos in both folders: the same content under different paths.
    photos(&a, 0..250);
    photos(&b, 150..400);
    // The schema first, so both writers start on equal terms.
    drop(store::open(&pg.url(), true, &ConnectOptions::default()).unwrap());
    let (ca, cb) = (
        spawn_index(&a, &pg.url(), 4, true),
        spawn_index(&b, &pg.url(), 4, true),
    );
    let (oa, ob) = (
        ca.wait_with_output().unwrap(),
        cb.wait_with_output().unwrap(),
    );
    let (sa, sb) = (ok(&oa), ok(&ob));
    assert_eq!(
        sa["embedded"].as_u64().unwrap() + sb["embedded"].as_u64().unwrap(),
        400,
        "400 distinct photos, each embedded once: {sa} {sb}"
    );
    assert_eq!(sa["added"], 250);
    assert_eq!(sb["added"], 250);
    let mut s = store::open(&pg.url(), false, &ConnectOptions::default()).unwrap();
    assert_eq!(
        s.files_under(&[]).unwrap().len(),
        500,
        "no lost or doubled rows"
    );
    let model = s.models().unwrap()[0].id;
    assert_eq!(s.model_vectors(model).unwrap().len(), 400);
    assert_eq!(s.check(Some(model)).unwrap(), Vec::<String>::new());
}

#[test]
fn sigkill_mid_run_leaves_postgres_consistent_and_a_rerun_completes() {
    let pg = Pg::start(55404);
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("photos");
    photos(&dir, 0..800);
    let mut child = spawn_index(&dir, &pg.url(), 1, false);
    // Kill it once some batches have committed.
    wait_for_files(&pg.url(), 50);
    child.kill().unwrap(); // SIGKILL
    assert!(!child.wait().unwrap().success(), "killed before the end");
    let mut s = store::open(&pg.url(), false, &ConnectOptions::default()).unwrap();
    let before = s.files_under(&[]).unwrap().len();
    assert!(
        (50..800).contains(&before),
        "killed halfway: {before} committed"
    );
    let model = s.models().unwrap()[0].id;
    assert_eq!(
        s.check(Some(model)).unwrap(),
        Vec::<String>::new(),
        "consistent after SIGKILL"
    );
    drop(s);
    let r = index(&dir, &pg.url());
    assert_eq!(r["embedded"].as_u64(), Some((800 - before) as u64), "{r}");
    assert_eq!(store_files(&pg.url()).len(), 800);

    // The server restarts in the middle of a run: the run stops with an
    // error naming the store, and the next run completes the work.
    photos(&dir, 800..1400);
    let child = spawn_index(&dir, &pg.url(), 1, false);
    wait_for_files(&pg.url(), 820);
    pg.stop();
    pg.restart();
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "the run lost its server");
    assert!(
        err.contains("127.0.0.1:55404")
            && (err.contains("terminating connection") || err.contains("is the server running?")),
        "names the store and what happened: {err}"
    );
    let r = index(&dir, &pg.url());
    assert_eq!(store_files(&pg.url()).len(), 1400, "{r}");

    // A server that is down when a search starts: a clear error, no hang.
    pg.stop();
    let o = clasp(&[
        "search",
        "a dog",
        "--dir",
        dir.to_str().unwrap(),
        "--store",
        &pg.url(),
        "--no-index",
        "--timeout",
        "3",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("127.0.0.1:55404") && err.contains("is the server running?"),
        "names the store and says what is wrong: {err}"
    );
    pg.restart();
    assert_eq!(search(&pg.url(), &dir, "a dog", 5).len(), 5);
}

#[test]
fn store_copy_both_ways_keeps_every_file_vector_and_search_result() {
    let pg = Pg::start(55405);
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("photos");
    photos(&dir, 0..150);
    let sqlite = d.path().join("s.sqlite");
    index(&dir, sqlite.to_str().unwrap());
    let c = copy(sqlite.to_str().unwrap(), &pg.url());
    assert_eq!(
        (c["files"].as_u64(), c["vectors"].as_u64()),
        (Some(150), Some(150))
    );
    // Again: nothing is written twice (a resumed copy carries on the same way).
    let c = copy(sqlite.to_str().unwrap(), &pg.url());
    assert_eq!(
        (c["vectors"].as_u64(), c["vectors_present"].as_u64()),
        (Some(0), Some(150))
    );
    let back = d.path().join("back.sqlite");
    let c = copy(&pg.url(), back.to_str().unwrap());
    assert_eq!(c["vectors"].as_u64(), Some(150));
    for s in [&pg.url(), &back.display().to_string()] {
        let o = clasp(&["store", "check", s]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    for q in QUERIES {
        let a = search(sqlite.to_str().unwrap(), &dir, q, 15);
        assert_same_hits(&a, &search(&pg.url(), &dir, q, 15), q);
        assert_same_hits(&a, &search(back.to_str().unwrap(), &dir, q, 15), q);
    }
    // `clasp serve --store postgres://...` answers /v1/search as the CLI does.
    let server = common::Server::start(&[
        "serve",
        "-m",
        &common::tiny(),
        "--store",
        &pg.url(),
        "--addr",
        "127.0.0.1:0",
    ]);
    let (status, v, _) = server.post(
        "/v1/search",
        &serde_json::json!({"query": QUERIES[0], "k": 15, "dir": dir.canonicalize().unwrap()}),
    );
    assert_eq!(status, 200, "{v}");
    let served = hits(&v["data"]);
    assert_same_hits(
        &search(sqlite.to_str().unwrap(), &dir, QUERIES[0], 15),
        &served,
        "serve",
    );
    drop(server);
    // The copy needed no model: an index run afterwards embeds nothing.
    let s = index(&dir, &pg.url());
    assert_eq!(s["embedded"].as_u64(), Some(0), "{s}");
}

#[test]
fn bad_settings_get_errors_that_name_them_and_never_show_the_password() {
    let pg = Pg::start(55406);
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("photos");
    photos(&dir, 0..3);
    let run = |store: &str| {
        let o = clasp(&[
            "index",
            dir.to_str().unwrap(),
            "-m",
            &common::tiny(),
            "--store",
            store,
            "--timeout",
            "3",
        ]);
        assert!(!o.status.success(), "{store} must fail");
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let e = run("postgres://clasp:hunter2@127.0.0.1:55406/clasp");
    assert!(e.contains("password authentication failed"), "{e}");
    assert!(
        e.contains("PGPASSWORD"),
        "says where passwords come from: {e}"
    );
    assert!(!e.contains("hunter2"), "the password is never printed: {e}");
    let e = run("postgres://clasp:clasp@127.0.0.1:55406/nosuchdb");
    assert!(
        e.contains("nosuchdb") && e.contains("does not exist"),
        "{e}"
    );
    let e = run("postgres://clasp:clasp@127.0.0.1:1/clasp");
    assert!(
        e.contains("127.0.0.1:1") && e.contains("is the server running?"),
        "{e}"
    );
    let e = run("postgres://clasp:clasp@127.0.0.1:notaport/clasp");
    assert!(e.contains("not a PostgreSQL URL"), "{e}");
    // A server without pgvector (PostgreSQL 18 looks for extensions where
    // extension_control_path says; here, an empty folder).
    let empty = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        empty.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let mut c = postgres::Client::connect(&pg.url(), postgres::NoTls).unwrap();
    c.batch_execute("CREATE DATABASE novector").unwrap();
    c.batch_execute(&format!(
        "ALTER DATABASE novector SET extension_control_path = '{}'",
        empty.path().display()
    ))
    .unwrap();
    let e = run("postgres://clasp:clasp@127.0.0.1:55406/novector");
    assert!(e.contains("no pgvector extension"), "{e}");
    // PGPASSWORD stands in for a URL without one.
    let o = Command::new(env!("CARGO_BIN_EXE_clasp"))
        .args([
            "index",
            dir.to_str().unwrap(),
            "-m",
            &common::tiny(),
            "--store",
            &format!("postgres://clasp@127.0.0.1:{}/clasp", pg.port),
        ])
        .env("PGPASSWORD", "clasp")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// `clasp store init --shard A --shard B` on a coordinator: every vector
/// lives on one of the shards, and exact search through the coordinator
/// returns what one node returns; so does HNSW at a high ef, the first
/// such search building each shard's index. A shard that is down fails a
/// search by name, or, with `--allow-partial`, leaves exactly the other
/// shard's share of the results, flagged; once it is back, searches are
/// whole again.
#[test]
fn a_two_shard_store_answers_exactly_as_one_node() {
    let (single, coord, s0, s1) = (
        Pg::start(55411),
        Pg::start(55412),
        Pg::start(55413),
        Pg::start(55414),
    );
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("photos");
    photos(&dir, 0..200);
    let init = || {
        clasp(&[
            "store",
            "init",
            "--store",
            &coord.url(),
            "--shard",
            &s0.url(),
            "--shard",
            &s1.url(),
        ])
    };
    let o = init();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A second init refuses: the store is already sharded.
    assert!(!init().status.success());
    index(&dir, &single.url());
    let s = index(&dir, &coord.url());
    assert_eq!(s["embedded"].as_u64(), Some(200));
    // The vectors are on the shards, split by hash, none on the coordinator.
    let count = |pg: &Pg, table: &str| -> i64 {
        let mut c = postgres::Client::connect(&pg.url(), postgres::NoTls).unwrap();
        c.query_one(&format!("SELECT COUNT(*) FROM {table}"), &[])
            .unwrap()
            .get(0)
    };
    let (n0, n1) = (
        count(&s0, "clasp_vectors_1_p0"),
        count(&s1, "clasp_vectors_1_p1"),
    );
    assert_eq!(n0 + n1, 200);
    assert!(n0 > 50 && n1 > 50, "split by hash: {n0} + {n1}");
    for q in QUERIES {
        let a = search(&single.url(), &dir, q, 20);
        let b = search(&coord.url(), &dir, q, 20);
        assert_same_hits(&a, &b, q);
    }
    // HNSW: no shard has an index until a search wants one; then each
    // shard builds its own, and ef 400 over 200 vectors is exact.
    let has_hnsw = |pg: &Pg, index: &str| -> bool {
        let mut c = postgres::Client::connect(&pg.url(), postgres::NoTls).unwrap();
        c.query_one("SELECT to_regclass($1) IS NOT NULL", &[&index])
            .unwrap()
            .get(0)
    };
    assert!(!has_hnsw(&s0, "clasp_vectors_1_p0_hnsw"));
    for q in QUERIES {
        let a = search(&single.url(), &dir, q, 10);
        let b = hits(&ok(&search_output(
            &coord.url(),
            &dir,
            q,
            10,
            &["--ann-threshold", "1", "--ef-search", "400"],
        )));
        assert_same_hits(&a, &b, &format!("hnsw over shards: {q}"));
    }
    assert!(has_hnsw(&s0, "clasp_vectors_1_p0_hnsw"));
    assert!(has_hnsw(&s1, "clasp_vectors_1_p1_hnsw"));
    let o = clasp(&["store", "check", &coord.url()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // What shard 0 alone holds, as paths (through the single node's catalog).
    let on_shard0: BTreeSet<String> = {
        let mut c = postgres::Client::connect(&s0.url(), postgres::NoTls).unwrap();
        let hashes: Vec<Vec<u8>> = c
            .query("SELECT hash FROM clasp_vectors_1_p0", &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut c = postgres::Client::connect(&single.url(), postgres::NoTls).unwrap();
        c.query(
            "SELECT path FROM clasp_files WHERE hash = ANY($1)",
            &[&hashes],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    // A shard that is down: the error names it.
    s1.stop();
    let o = clasp(&[
        "search",
        "a dog",
        "--dir",
        dir.to_str().unwrap(),
        "--store",
        &coord.url(),
        "--no-index",
        "--timeout",
        "5",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("clasp_shard_1"), "names the shard: {err}");
    // --allow-partial: shard 0's share of the whole answer, in its order,
    // flagged on stderr and by exit code 1.
    for q in QUERIES {
        let whole = search(&single.url(), &dir, q, 200);
        let expect: Vec<(String, f64)> = whole
            .into_iter()
            .filter(|(p, _)| on_shard0.contains(p))
            .take(10)
            .collect();
        let o = search_output(
            &coord.url(),
            &dir,
            q,
            10,
            &[
                "--ann-threshold",
                "100000000",
                "--allow-partial",
                "--timeout",
                "5",
            ],
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "partial results exit 1: {err}");
        assert!(
            err.contains("partial results") && err.contains("clasp_shard_1"),
            "flags the missing shard: {err}"
        );
        let got = hits(&serde_json::from_slice(&o.stdout).unwrap());
        assert_same_hits(&expect, &got, &format!("partial: {q}"));
    }
    // The shard is back: searches are whole again.
    s1.restart();
    for q in QUERIES {
        let a = search(&single.url(), &dir, q, 20);
        let b = search(&coord.url(), &dir, q, 20);
        assert_same_hits(&a, &b, &format!("after the shard's restart: {q}"));
    }
}

/// Searches go to a streaming replica (`--replica`), which answers as the
/// primary does once it has replayed the index run; a replica that is down
/// is skipped with a warning.
#[test]
fn searches_go_to_a_replica_and_skip_one_that_is_down() {
    let primary = Pg::start(55421);
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("photos");
    photos(&dir, 0..80);
    index(&dir, &primary.url());
    let replica = Pg { port: 55422 };
    let _ = replica.script(&["destroy", "55422"]);
    let o = replica.script(&["replica", "55421", "55422"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The replica is read-only and has the primary's rows.
    let mut c = postgres::Client::connect(&replica.url(), postgres::NoTls).unwrap();
    let in_recovery: bool = c
        .query_one("SELECT pg_is_in_recovery()", &[])
        .unwrap()
        .get(0);
    assert!(in_recovery, "a standby");
    let t0 = std::time::Instant::now();
    while c
        .query_one("SELECT COUNT(*) FROM clasp_files", &[])
        .unwrap()
        .get::<_, i64>(0)
        < 80
    {
        assert!(t0.elapsed().as_secs() < 30, "the replica caught up");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let url = primary.url();
    let with_replica = |extra: &[&str]| {
        let mut args = vec!["--timeout", "3"];
        args.extend_from_slice(extra);
        search_output(&url, &dir, "a dog on grass", 10, &args)
    };
    let scans = |c: &mut postgres::Client| -> i64 {
        c.batch_execute("SELECT pg_stat_clear_snapshot()").unwrap();
        c.query_one(
            "SELECT COALESCE(SUM(COALESCE(seq_scan, 0) + COALESCE(idx_scan, 0)), 0)::int8
             FROM pg_stat_user_tables WHERE relname = 'clasp_vectors_1'",
            &[],
        )
        .unwrap()
        .get(0)
    };
    let direct = ok(&with_replica(&[]));
    let before = scans(&mut c);
    let rurl = replica.url();
    let via = with_replica(&["--replica", &rurl]);
    assert_eq!(ok(&via), direct, "the replica answers as the primary");
    // The search really went there: the replica counts a scan of the vectors.
    let t0 = std::time::Instant::now();
    while scans(&mut c) <= before {
        assert!(
            t0.elapsed().as_secs() < 10,
            "the replica scanned the vectors"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    drop(c);
    replica.stop();
    let o = with_replica(&["--replica", &rurl]);
    assert_eq!(ok(&o), direct, "a replica that is down is skipped");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("skipping replica") && err.contains("55422"),
        "{err}"
    );
}

/// `--pg-vector halfvec` keeps f16 vectors (half the space): each stored
/// value is the f32 one rounded to f16, and searches find the f32 store's
/// neighbours with scores within f16's rounding.
#[test]
fn a_halfvec_store_holds_f16_vectors_and_finds_the_same_neighbours() {
    let pg = Pg::start(55431);
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("photos");
    photos(&dir, 0..120);
    let sqlite = d.path().join("s.sqlite");
    index(&dir, sqlite.to_str().unwrap());
    let o = clasp(&[
        "index",
        dir.to_str().unwrap(),
        "-m",
        &common::tiny(),
        "--store",
        &pg.url(),
        "--json",
        "--check",
        "--pg-vector",
        "halfvec",
    ]);
    ok(&o);
    let mut c = postgres::Client::connect(&pg.url(), postgres::NoTls).unwrap();
    let ty: String = c
        .query_one(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute
             WHERE attrelid = 'clasp_vectors_1'::regclass AND attname = 'embedding'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(ty.starts_with("halfvec("), "{ty}");
    let mut lite =
        store::open(sqlite.to_str().unwrap(), false, &ConnectOptions::default()).unwrap();
    let mut pgs = store::open(&pg.url(), false, &ConnectOptions::default()).unwrap();
    let a = lite.model_vectors(1).unwrap();
    let b = pgs.model_vectors(1).unwrap();
    assert_eq!(a.len(), b.len());
    for ((ha, va), (hb, vb)) in a.iter().zip(&b) {
        assert_eq!(ha, hb);
        for (x, y) in va.iter().zip(vb) {
            assert_eq!(half::f16::from_f32(*x).to_f32(), *y, "f16 of the f32 value");
        }
    }
    for q in QUERIES {
        let f32_hits = search(sqlite.to_str().unwrap(), &dir, q, 20);
        let f16_hits = search(&pg.url(), &dir, q, 20);
        let set: BTreeSet<&str> = f32_hits.iter().map(|h| h.0.as_str()).collect();
        let same = f16_hits
            .iter()
            .filter(|h| set.contains(h.0.as_str()))
            .count();
        assert!(same >= 18, "{q}: {same} of 20 shared");
        for h in &f16_hits {
            if let Some(f) = f32_hits.iter().find(|x| x.0 == h.0) {
                assert!((f.1 - h.1).abs() < 5e-3, "{q}: {} vs {}", f.1, h.1);
            }
        }
    }
    // The HNSW index over halfvec (halfvec_cosine_ops) serves a search too.
    let v = ok(&search_output(
        &pg.url(),
        &dir,
        "a dog",
        10,
        &["--ann-threshold", "1", "--ef-search", "200"],
    ));
    assert_eq!(v.as_array().unwrap().len(), 10);
    let opclass: String = c
        .query_one(
            "SELECT opcname FROM pg_index i JOIN pg_opclass o ON o.oid = i.indclass[0]
             WHERE i.indrelid = 'clasp_vectors_1'::regclass AND NOT i.indisprimary",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(opclass, "halfvec_cosine_ops");
}

/// A TLS-terminating proxy for PostgreSQL on 127.0.0.1: it answers the
/// client's SSLRequest with `S`, does the TLS handshake with `cert`, and
/// pipes the plaintext to the server on `pg_port`. The test servers' build
/// has no OpenSSL, so this stands in for a server with `ssl = on`. Returns
/// the proxy's port and the count of completed handshakes.
fn tls_proxy(
    cert: rustls_pki::CertificateDer<'static>,
    key: Vec<u8>,
    pg_port: u16,
) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert],
        rustls_pki::PrivateKeyDer::Pkcs8(rustls_pki::PrivatePkcs8KeyDer::from(key)),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let handshakes = Arc::new(AtomicUsize::new(0));
    let count = handshakes.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, count) = (acceptor.clone(), count.clone());
                tokio::spawn(async move {
                    // SSLRequest: length 8, code 80877103. Anything else
                    // (a plaintext startup) is refused by closing.
                    let mut req = [0u8; 8];
                    if client.read_exact(&mut req).await.is_err()
                        || req != [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]
                        || client.write_all(b"S").await.is_err()
                    {
                        return;
                    }
                    let Ok(mut tls) = acceptor.accept(client).await else {
                        return;
                    };
                    count.fetch_add(1, Ordering::SeqCst);
                    let Ok(mut server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", pg_port)).await
                    else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut server).await;
                });
            }
        });
    });
    (port, handshakes)
}

/// TLS: with `sslmode=require` clasp negotiates TLS and verifies the
/// server's certificate and name against the URL's `sslrootcert`; a store
/// reached that way indexes and searches as over plaintext. A certificate
/// from another CA, no `sslrootcert` (Mozilla's roots), a missing PEM file,
/// and a server without TLS each get an error that says so.
#[test]
fn tls_connections_verify_the_server_against_sslrootcert() {
    use std::sync::atomic::Ordering;
    let pg = Pg::start(55421);
    let d = tempfile::tempdir().unwrap();
    let ca_pair = |name: &str| {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap()
    };
    let (ca, other_ca) = (ca_pair("clasp test CA"), ca_pair("another CA"));
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &ca)
            .unwrap();
    let (ca_pem, other_pem) = (d.path().join("ca.pem"), d.path().join("other.pem"));
    std::fs::write(&ca_pem, ca.pem()).unwrap();
    std::fs::write(&other_pem, other_ca.pem()).unwrap();
    let (port, handshakes) = tls_proxy(leaf.der().clone(), leaf_key.serialize_der(), pg.port);
    let tls_url = |params: &str| format!("postgres://clasp:clasp@127.0.0.1:{port}/clasp?{params}");
    let good = tls_url(&format!("sslmode=require&sslrootcert={}", ca_pem.display()));

    let dir = d.path().join("photos");
    photos(&dir, 0..30);
    let s = index(&dir, &good);
    assert_eq!(s["embedded"].as_u64(), Some(30));
    assert!(
        handshakes.load(Ordering::SeqCst) > 0,
        "the index run went through TLS"
    );
    // libpq's verify-full is accepted (rustls always verifies).
    let full = tls_url(&format!(
        "sslmode=verify-full&sslrootcert={}",
        ca_pem.display()
    ));
    for q in QUERIES {
        assert_same_hits(
            &search(&pg.url(), &dir, q, 10),
            &search(&full, &dir, q, 10),
            &format!("over TLS: {q}"),
        );
    }
    let fails = |url: &str| -> String {
        let o = search_output(url, &dir, "a dog", 5, &["--timeout", "5"]);
        assert!(!o.status.success(), "{url} must not connect");
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(
            !err.contains("clasp:clasp"),
            "the password stays hidden: {err}"
        );
        err
    };
    let before = handshakes.load(Ordering::SeqCst);
    for url in [
        tls_url(&format!(
            "sslmode=require&sslrootcert={}",
            other_pem.display()
        )),
        tls_url("sslmode=require"),
    ] {
        let err = fails(&url);
        assert!(
            err.contains("not trusted") && err.contains("sslrootcert"),
            "an untrusted certificate says how to trust it: {err}"
        );
    }
    assert_eq!(
        handshakes.load(Ordering::SeqCst),
        before,
        "no handshake completed"
    );
    let missing = d.path().join("nowhere.pem");
    let err = fails(&tls_url(&format!(
        "sslmode=require&sslrootcert={}",
        missing.display()
    )));
    assert!(
        err.contains("nowhere.pem"),
        "a missing root file is named: {err}"
    );
    let err = fails(&format!("{}?sslmode=require", pg.url()));
    assert!(
        err.contains("does not offer"),
        "a server without TLS: {err}"
    );
}
