//! Search and indexing benchmarks (figures go to bench/RESULTS.md, never to tests).
//!
//!   cargo run --release --example bench_index -- search [--sizes 10000,100000,1000000]
//!   cargo run --release --example bench_index -- indexing MODEL_DIR [N_IMAGES] [ROUNDS]
//!
//! `search`: synthetic clustered unit vectors (dim 512, like CLIP embeddings:
//! 2000 cluster centres plus noise), exact and HNSW latency p50/p99 over
//! single queries, HNSW build time, and HNSW recall@10 against exact search.
//!
//! `indexing`: `index::index` into a fresh store against the bare encoder on
//! the same files (`Encoder::embed_image_files`, what `clasp embed` runs),
//! interleaved rounds, medians and their ratio.
//!
//! `postgres` (driven by bench/pg_store.sh, which starts the servers): the
//! PostgreSQL store against the embedded one in one run. Indexing the same
//! photos into a fresh SQLite store and a fresh PostgreSQL database,
//! interleaved rounds; then k-NN latency p50/p99 and HNSW recall@10 against
//! exact, over the same synthetic vectors, for the embedded store, one
//! PostgreSQL node, a two-shard coordinator and a streaming replica.

use std::time::Instant;

use clasp::index::engine::{ann_recall, write_snapshot, AnnIndex, ExactIndex, Snapshot};
use clasp::index::store::{self, ConnectOptions, Store};
use clasp::index::{self, Catalog, IndexOptions, VectorSearch};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        // xorshift64* -> uniform, Box–Muller-free approximate normal (sum of 4 uniforms)
        let mut s = 0.0;
        for _ in 0..4 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let u = (self.0.wrapping_mul(0x2545F4914F6CDD1D) >> 40) as f32 / (1u64 << 24) as f32;
            s += u - 0.5;
        }
        s
    }
}

fn normalize(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= n);
}

fn clustered(n: usize, dim: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut r = Rng(seed);
    let centres: Vec<Vec<f32>> = (0..2000)
        .map(|_| {
            let mut c: Vec<f32> = (0..dim).map(|_| r.next()).collect();
            normalize(&mut c);
            c
        })
        .collect();
    (0..n)
        .map(|i| {
            let c = &centres[(i * 7919) % centres.len()];
            let mut v: Vec<f32> = c
                .iter()
                .map(|x| x + 0.6 * r.next() / (dim as f32).sqrt() * 3.0)
                .collect();
            normalize(&mut v);
            v
        })
        .collect()
}

/// Queries: perturbed stored vectors (a near-duplicate photo, a paraphrase).
fn perturbed_queries(rows: &[([u8; 32], Vec<f32>)], count: usize) -> Vec<Vec<f32>> {
    let mut r = Rng(7);
    (0..count)
        .map(|i| {
            let mut q: Vec<f32> = rows[(i * 104729) % rows.len()]
                .1
                .iter()
                .map(|x| x + 0.05 * r.next())
                .collect();
            normalize(&mut q);
            q
        })
        .collect()
}

fn pct(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn search_bench(sizes: &[usize]) {
    let dim = 512;
    let dir = tempfile::tempdir().unwrap();
    println!("| vectors | engine | build s | p50 ms | p99 ms | recall@10 vs exact |");
    println!("|---|---|---|---|---|---|");
    for &n in sizes {
        let data = clustered(n, dim, 42 + n as u64);
        let rows: Vec<([u8; 32], Vec<f32>)> = data
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                let mut h = [0u8; 32];
                h[..8].copy_from_slice(&(i as u64).to_le_bytes());
                (h, v)
            })
            .collect();
        let store = dir.path().join(format!("s{n}.sqlite"));
        let snap_path = index::engine::snapshot_path(&store, 1);
        write_snapshot(&snap_path, 1, &rows).unwrap();
        let queries = perturbed_queries(&rows, 300);
        drop(rows);
        let exact = ExactIndex {
            snap: Snapshot::open_file(&snap_path).unwrap(),
        };
        let _ = exact.top_rows(&queries[0], 10, None); // fault the pages in
        let times: Vec<f64> = queries
            .iter()
            .take(100)
            .map(|q| {
                let t = Instant::now();
                std::hint::black_box(exact.top_rows(q, 10, None));
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        println!(
            "| {n} | exact | – | {:.2} | {:.2} | 1 |",
            pct(times.clone(), 0.5),
            pct(times, 0.99)
        );
        let t = Instant::now();
        let ann = AnnIndex::open(&store, 1, Snapshot::open_file(&snap_path).unwrap()).unwrap();
        let build = t.elapsed().as_secs_f64();
        for ef in [64usize, 256] {
            ann.set_expansion(ef);
            let times: Vec<f64> = queries
                .iter()
                .map(|q| {
                    let t = Instant::now();
                    std::hint::black_box(ann.top_rows(q, 10).unwrap());
                    t.elapsed().as_secs_f64() * 1e3
                })
                .collect();
            let recall = ann_recall(&exact, &ann, &queries[..200], 10).unwrap();
            println!(
                "| {n} | hnsw ef={ef} | {build:.1} | {:.3} | {:.3} | {recall:.4} |",
                pct(times.clone(), 0.5),
                pct(times, 0.99)
            );
        }
    }
}

fn indexing_bench(model: &str, n: usize, rounds: usize) {
    let enc = clasp::Encoder::load(model, &candle_core::Device::Cpu).unwrap();
    let (dir, photos) = photo_folder(n);
    let mut paths: Vec<_> = std::fs::read_dir(&photos)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    paths.sort();
    let (mut bare, mut idx) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let t = Instant::now();
        let r = enc.embed_image_files(&paths, 32, |_| {}).unwrap();
        assert_eq!(r.embeddings.len(), n);
        bare.push(n as f64 / t.elapsed().as_secs_f64());
        let mut cat = Catalog::open(&dir.path().join(format!("s{round}.sqlite"))).unwrap();
        idx.push(index_once(&mut cat, &enc, model, &photos));
        println!(
            "round {round}: bare {:.1} img/s, index {:.1} img/s",
            bare[round], idx[round]
        );
    }
    let (b, i) = (pct(bare, 0.5), pct(idx, 0.5));
    println!(
        "median: bare encoder {b:.1} img/s, clasp index {i:.1} img/s, ratio {:.3}",
        i / b
    );
}

fn photo_folder(n: usize) -> (tempfile::TempDir, std::path::PathBuf) {
    let src = std::path::Path::new("../shared/data/flickr8k/images");
    let mut names: Vec<_> = std::fs::read_dir(src)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    names.sort();
    names.truncate(n);
    let dir = tempfile::tempdir().unwrap();
    let photos = dir.path().join("photos");
    std::fs::create_dir(&photos).unwrap();
    for p in &names {
        std::fs::copy(p, photos.join(p.file_name().unwrap())).unwrap();
    }
    (dir, photos)
}

/// A fresh database `name` on the server of `url` (dropped first), and its URL.
fn fresh_db(url: &str, name: &str) -> String {
    let mut c = postgres::Client::connect(url, postgres::NoTls).unwrap();
    c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .unwrap();
    c.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
    let (base, _) = url.rsplit_once('/').unwrap();
    format!("{base}/{name}")
}

fn index_once(
    store: &mut dyn Store,
    enc: &clasp::Encoder,
    model: &str,
    photos: &std::path::Path,
) -> f64 {
    let t = Instant::now();
    let id = index::model_id(store, enc, model).unwrap();
    let s = index::index(
        store,
        enc,
        id,
        &[photos.to_path_buf()],
        &IndexOptions {
            batch_size: 32,
            excludes: vec![],
            video: None,
        },
        &clasp::progress::Silent,
    )
    .unwrap();
    assert!(s.failed.is_empty());
    s.embedded as f64 / t.elapsed().as_secs_f64()
}

/// An embedded store of `n` synthetic files under `dir` (which need not
/// hold them: `search --no-index` reads only the store) with clustered
/// unit vectors for `model`, as an index run would leave it: for timing a
/// search process from cold (bench/cold_start.py).
fn synth_store(model: &str, store: &str, dir: &str, n: usize) {
    let enc = clasp::Encoder::load(model, &candle_core::Device::Cpu).unwrap();
    let mut cat = Catalog::open(std::path::Path::new(store)).unwrap();
    let id = index::model_id(&mut cat, &enc, model).unwrap();
    let dir = std::path::Path::new(dir).canonicalize().unwrap();
    let data = clustered(n, enc.embedding_dim(), 7);
    for (c, chunk) in data.chunks(10_000).enumerate() {
        cat.write(|w| {
            for (j, v) in chunk.iter().enumerate() {
                let i = c * 10_000 + j;
                let hash = *blake3::hash(&(i as u64).to_le_bytes()).as_bytes();
                w.upsert_file(&index::catalog::FileRow {
                    path: dir.join(format!("{i:07}.jpg")).display().to_string(),
                    size: 100_000,
                    mtime_ns: 0,
                    hash: Some(hash),
                    error: None,
                    caption: String::new(),
                })?;
                w.put_vector(id, &hash, v)?;
            }
            Ok(())
        })
        .unwrap();
    }
    println!("{store}: {n} files under {} for {model}", dir.display());
}

struct PgTargets {
    single: String,
    sharded: String,
    shards: Vec<String>,
    replica: String,
}

fn postgres_bench(pg: &PgTargets, model: &str, n_photos: usize, rounds: usize, sizes: &[usize]) {
    let opts = ConnectOptions {
        timeout: std::time::Duration::from_secs(600),
        ..Default::default()
    };
    // 1. Indexing throughput.
    let enc = clasp::Encoder::load(model, &candle_core::Device::Cpu).unwrap();
    let (dir, photos) = photo_folder(n_photos);
    let (mut lite, mut pgr) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let mut cat = Catalog::open(&dir.path().join(format!("s{round}.sqlite"))).unwrap();
        lite.push(index_once(&mut cat, &enc, model, &photos));
        let url = fresh_db(&pg.single, &format!("bench_index_{round}"));
        let mut st = store::open(&url, true, &opts).unwrap();
        pgr.push(index_once(st.as_mut(), &enc, model, &photos));
        println!(
            "round {round}: embedded {:.1} img/s, postgres {:.1} img/s",
            lite[round], pgr[round]
        );
    }
    let (a, b) = (pct(lite, 0.5), pct(pgr, 0.5));
    println!(
        "indexing {n_photos} photos ({model}): embedded {a:.1} img/s, postgres {b:.1} img/s, ratio {:.3}",
        b / a
    );
    // 2. Search.
    let dim = 512;
    println!(
        "| vectors | store | engine | load / build s | p50 ms | p99 ms | recall@10 vs exact |"
    );
    println!("|---|---|---|---|---|---|---|");
    let key = [7u8; 32];
    for &n in sizes {
        let data = clustered(n, dim, 42 + n as u64);
        let rows: Vec<([u8; 32], Vec<f32>)> = data
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                let h = *blake3::hash(&(i as u64).to_le_bytes()).as_bytes();
                (h, v)
            })
            .collect();
        let queries = perturbed_queries(&rows, 200);
        // The embedded store: the snapshot searched in process.
        let sdir = tempfile::tempdir().unwrap();
        let sstore = sdir.path().join("s.sqlite");
        let snap_path = index::engine::snapshot_path(&sstore, 1);
        let mut sorted = rows.clone();
        sorted.sort_by_key(|a| a.0);
        write_snapshot(&snap_path, 1, &sorted).unwrap();
        drop(sorted);
        let exact = ExactIndex {
            snap: Snapshot::open_file(&snap_path).unwrap(),
        };
        let truth: Vec<Vec<[u8; 32]>> = queries
            .iter()
            .map(|q| {
                exact
                    .search(q, 10, None)
                    .unwrap()
                    .into_iter()
                    .map(|x| x.0)
                    .collect()
            })
            .collect();
        let t = Instant::now();
        let ann = AnnIndex::open(&sstore, 1, Snapshot::open_file(&snap_path).unwrap()).unwrap();
        let build = t.elapsed().as_secs_f64();
        report(n, "embedded", "exact", None, &exact, &queries, &truth);
        for ef in [64usize, 256] {
            ann.set_expansion(ef);
            report(
                n,
                "embedded",
                &format!("hnsw ef={ef}"),
                Some(build),
                &ann,
                &queries,
                &truth,
            );
        }
        // PostgreSQL: one node (its replica streams the same rows), and the
        // two-shard coordinator.
        let db = format!("bench_search_{n}");
        let single = fresh_db(&pg.single, &db);
        let sharded = fresh_db(&pg.sharded, &db);
        for s in &pg.shards {
            fresh_db(s, &db);
        }
        let shard_urls: Vec<String> = pg
            .shards
            .iter()
            .map(|s| format!("{}/{db}", s.rsplit_once('/').unwrap().0))
            .collect();
        let mut coord = clasp::index::postgres::PgStore::connect(&sharded, &opts).unwrap();
        coord.init_shards(&shard_urls).unwrap();
        drop(coord);
        for (name, url) in [
            ("postgres, 1 node", &single),
            ("postgres, 2 shards", &sharded),
        ] {
            let mut st = store::open(url, true, &opts).unwrap();
            let id = st.model_id(&key, "synthetic", dim).unwrap();
            let t = Instant::now();
            for chunk in rows.chunks(2000) {
                st.write(|w| {
                    for (h, v) in chunk {
                        w.put_vector(id, h, v)?;
                    }
                    Ok(())
                })
                .unwrap();
            }
            let load = t.elapsed().as_secs_f64();
            let e = st.engine(id, usize::MAX).unwrap();
            report(n, name, "exact", Some(load), e.as_ref(), &queries, &truth);
            // The first HNSW engine builds the index (a sharded store's
            // shards build theirs at the same time).
            let t = Instant::now();
            let e = st.engine(id, 1).unwrap();
            let build = t.elapsed().as_secs_f64();
            for ef in [64usize, 256] {
                e.set_ef_search(ef);
                report(
                    n,
                    name,
                    &format!("hnsw ef={ef}"),
                    Some(build),
                    e.as_ref(),
                    &queries,
                    &truth,
                );
            }
            if url == &single {
                let replica_url = format!("{}/{db}", pg.replica.rsplit_once('/').unwrap().0);
                let ropts = ConnectOptions {
                    replicas: vec![replica_url.clone()],
                    ..opts.clone()
                };
                // Wait for the replica to replay the load.
                let mut rc = postgres::Client::connect(&replica_url, postgres::NoTls).unwrap();
                let table = format!("clasp_vectors_{id}");
                while rc
                    .query_one(&format!("SELECT COUNT(*) FROM {table}"), &[])
                    .map(|r| r.get::<_, i64>(0))
                    .unwrap_or(0)
                    < n as i64
                {
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
                let mut st = store::open(url, false, &ropts).unwrap();
                let e = st.engine(id, usize::MAX).unwrap();
                report(
                    n,
                    "postgres, via replica",
                    "exact",
                    None,
                    e.as_ref(),
                    &queries,
                    &truth,
                );
                let e = st.engine(id, 1).unwrap();
                for ef in [64usize, 256] {
                    e.set_ef_search(ef);
                    report(
                        n,
                        "postgres, via replica",
                        &format!("hnsw ef={ef}"),
                        None,
                        e.as_ref(),
                        &queries,
                        &truth,
                    );
                }
            }
        }
    }
}

/// One row: p50/p99 over single queries (the first 100 for exact engines),
/// and recall@10 against `truth`.
fn report(
    n: usize,
    store: &str,
    engine: &str,
    build: Option<f64>,
    e: &dyn VectorSearch,
    queries: &[Vec<f32>],
    truth: &[Vec<[u8; 32]>],
) {
    let take = if engine == "exact" {
        100
    } else {
        queries.len()
    };
    let _ = e.search(&queries[0], 10, None).unwrap(); // warm
    let mut hit = 0;
    let times: Vec<f64> = queries
        .iter()
        .zip(truth)
        .take(take)
        .map(|(q, t)| {
            let t0 = Instant::now();
            let got = e.search(q, 10, None).unwrap();
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            hit += got.iter().filter(|g| t.contains(&g.0)).count();
            ms
        })
        .collect();
    let recall = hit as f64 / (10 * take) as f64;
    let build = build.map_or("–".to_string(), |b| format!("{b:.1}"));
    println!(
        "| {n} | {store} | {engine} | {build} | {:.2} | {:.2} | {recall:.4} |",
        pct(times.clone(), 0.5),
        pct(times, 0.99)
    );
}

fn main() {
    clasp::tune_allocator();
    // SAFETY: first thing in `main`, before any thread starts.
    unsafe { clasp::tune_threads() };
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("search") => {
            let sizes: Vec<usize> = args
                .iter()
                .position(|a| a == "--sizes")
                .map(|i| args[i + 1].split(',').map(|s| s.parse().unwrap()).collect())
                .unwrap_or_else(|| vec![10_000, 100_000, 1_000_000]);
            search_bench(&sizes);
        }
        Some("indexing") => {
            let model = args.get(1).expect("MODEL_DIR");
            let n = args.get(2).map(|s| s.parse().unwrap()).unwrap_or(256);
            let rounds = args.get(3).map(|s| s.parse().unwrap()).unwrap_or(3);
            indexing_bench(model, n, rounds);
        }
        Some("postgres") => {
            let get = |flag: &str| {
                args.iter()
                    .position(|a| a == flag)
                    .map(|i| args[i + 1].clone())
            };
            let pg = PgTargets {
                single: get("--single").expect("--single URL"),
                sharded: get("--sharded").expect("--sharded URL"),
                shards: get("--shards")
                    .expect("--shards URL,URL")
                    .split(',')
                    .map(String::from)
                    .collect(),
                replica: get("--replica").expect("--replica URL"),
            };
            let model = get("--model").expect("--model DIR");
            let photos = get("--photos").map_or(1000, |s| s.parse().unwrap());
            let rounds = get("--rounds").map_or(3, |s| s.parse().unwrap());
            let sizes: Vec<usize> = get("--sizes").map_or(vec![100_000], |s| {
                s.split(',').map(|x| x.parse().unwrap()).collect()
            });
            postgres_bench(&pg, &model, photos, rounds, &sizes);
        }
        Some("synth-store") => {
            let model = args.get(1).expect("MODEL_DIR");
            let store = args.get(2).expect("STORE");
            let dir = args.get(3).expect("DIR");
            let n = args.get(4).map_or(100_000, |s| s.parse().unwrap());
            synth_store(model, store, dir, n);
        }
        _ => {
            eprintln!("usage: bench_index search [--sizes A,B,C] | indexing MODEL_DIR [N] [ROUNDS] | postgres --single URL --sharded URL --shards URL,URL --replica URL --model DIR [--photos N] [--rounds R] [--sizes A,B] | synth-store MODEL_DIR STORE DIR [N]")
        }
    }
}
