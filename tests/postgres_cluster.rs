//! The PostgreSQL store across servers, end to end: shards over
//! postgres_fdw, read replicas, halfvec storage and TLS, against real
//! PostgreSQL 18 + pgvector servers that `scripts/postgres.sh` starts on
//! loopback (one per test, destroyed when the test ends, panics included).
//! The embedded SQLite store, or one node, is the independent expectation.

use std::collections::BTreeSet;

use clasp::index::{store, ConnectOptions};
use tokio_rustls::rustls::pki_types as rustls_pki;

mod common;
mod pg;

use pg::*;

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
