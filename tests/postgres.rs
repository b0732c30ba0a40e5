//! The PostgreSQL store, end to end, against real PostgreSQL 18 + pgvector
//! servers that `scripts/postgres.sh` starts on loopback (one per test, on
//! its own port, destroyed when the test ends, panics included).
//!
//! The embedded SQLite store is the independent expectation: the same
//! photos, the same model, the same queries.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use clasp::index::{store, ConnectOptions};

mod common;
mod pg;

use pg::*;

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
