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

use std::time::Instant;

use clasp::index::engine::{ann_recall, write_snapshot, AnnIndex, ExactIndex, Snapshot};
use clasp::index::{self, Catalog, IndexOptions};

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
        // Queries: perturbed stored vectors (a near-duplicate photo, a paraphrase).
        let mut r = Rng(7);
        let queries: Vec<Vec<f32>> = (0..300)
            .map(|i| {
                let mut q: Vec<f32> = rows[(i * 104729) % n]
                    .1
                    .iter()
                    .map(|x| x + 0.05 * r.next())
                    .collect();
                normalize(&mut q);
                q
            })
            .collect();
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
    let paths: Vec<_> = names
        .iter()
        .map(|p| {
            let to = photos.join(p.file_name().unwrap());
            std::fs::copy(p, &to).unwrap();
            to
        })
        .collect();
    let (mut bare, mut idx) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let t = Instant::now();
        let r = enc.embed_image_files(&paths, 32, |_| {}).unwrap();
        assert_eq!(r.embeddings.len(), n);
        bare.push(n as f64 / t.elapsed().as_secs_f64());
        let store = dir.path().join(format!("s{round}.sqlite"));
        let mut cat = Catalog::open(&store).unwrap();
        let t = Instant::now();
        let id = index::model_id(&mut cat, &enc, model).unwrap();
        let s = index::index(
            &mut cat,
            &enc,
            id,
            std::slice::from_ref(&photos),
            &IndexOptions {
                batch_size: 32,
                excludes: vec![],
            },
            &clasp::progress::Silent,
        )
        .unwrap();
        assert_eq!(s.embedded, n);
        idx.push(n as f64 / t.elapsed().as_secs_f64());
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

fn main() {
    clasp::tune_allocator();
    clasp::tune_threads();
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
        _ => {
            eprintln!("usage: bench_index search [--sizes A,B,C] | indexing MODEL_DIR [N] [ROUNDS]")
        }
    }
}
