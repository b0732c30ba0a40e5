//! Load benchmark of `clasp serve` on loopback (bounded in count and time).
//!
//!   cargo build --release && cargo run --release --example bench_serve -- MODEL_DIR [N_IMAGES]
//!
//! 1. Offline baseline: `Encoder::embed_image_files` at batch 32 (what
//!    `clasp embed --images-from` runs) on N Flickr8k photos, in images/s.
//! 2. Closed loop: 64 concurrent clients, each sending single-image
//!    `/v1/embeddings` requests back to back; throughput and its ratio to 1.
//! 3. Open loop at 25%, 50% and 90% of the offline throughput: requests sent
//!    on a fixed schedule, latency p50/p99 measured from the scheduled time.
//!
//! Errors other than 503 (deliberate shedding past capacity) are counted and
//! reported.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;

fn pct(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model = args.first().expect("MODEL_DIR").clone();
    let n: usize = args.get(1).map(|s| s.parse().unwrap()).unwrap_or(256);
    let src = std::path::Path::new("../shared/data/flickr8k/images");
    let mut paths: Vec<_> = std::fs::read_dir(src)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    paths.sort();
    paths.truncate(n);

    // 1. Offline.
    let enc = clasp::Encoder::load(&model, &candle_core::Device::Cpu).unwrap();
    let _ = enc.embed_image_files(&paths[..32], 32, |_| {}).unwrap(); // warm up
    let t = Instant::now();
    let r = enc.embed_image_files(&paths, 32, |_| {}).unwrap();
    assert_eq!(r.embeddings.len(), n);
    let offline = n as f64 / t.elapsed().as_secs_f64();
    println!("offline clasp embed, batch 32: {offline:.2} images/s");
    drop(enc);

    let bodies: Arc<Vec<String>> = Arc::new(
        paths
            .iter()
            .map(|p| {
                let b = base64::engine::general_purpose::STANDARD.encode(std::fs::read(p).unwrap());
                serde_json::json!({"images": [b]}).to_string()
            })
            .collect(),
    );

    // The release binary beside this example (target/release/examples/..).
    let bin = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("clasp");
    let mut child = Command::new(&bin)
        .args([
            "serve",
            "-m",
            &model,
            "--addr",
            "127.0.0.1:0",
            "--max-batch-size",
            "32",
            "--max-wait-ms",
            "5",
            "--max-queue",
            "256",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let l = lines.next().unwrap().unwrap();
        if let Some(a) = l.strip_prefix("listening on http://") {
            break a.to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let url = format!("http://{addr}/v1/embeddings");
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .build();
    let send = |agent: &ureq::Agent, body: &str| -> u16 {
        match agent
            .post(&url)
            .set("Content-Type", "application/json")
            .send_string(body)
        {
            Ok(r) => {
                let _ = r.into_string();
                200
            }
            Err(ureq::Error::Status(s, _)) => s,
            Err(_) => 599,
        }
    };
    // Warm up the server.
    for b in bodies.iter().take(8) {
        send(&agent, b);
    }

    // 2. Closed loop, 64 clients.
    let total = n * 2;
    let next = AtomicUsize::new(0);
    let errors = AtomicUsize::new(0);
    let shed = AtomicUsize::new(0);
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..64 {
            s.spawn(|| {
                let agent = ureq::AgentBuilder::new()
                    .timeout(Duration::from_secs(60))
                    .build();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total || t.elapsed() > Duration::from_secs(300) {
                        break;
                    }
                    match send(&agent, &bodies[i % n]) {
                        200 => {}
                        503 => {
                            shed.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
    });
    let done = next.load(Ordering::Relaxed).min(total);
    let closed = (done - shed.load(Ordering::Relaxed)) as f64 / t.elapsed().as_secs_f64();
    println!(
        "closed loop, 64 clients: {closed:.2} images/s = {:.3}x offline ({} requests, {} shed with 503, {} other errors)",
        closed / offline,
        done,
        shed.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed)
    );

    // 3. Open loop at fractions of the offline throughput.
    println!("| load | rate/s | requests | p50 ms | p99 ms | 503 | other errors |");
    println!("|---|---|---|---|---|---|---|");
    for frac in [0.25, 0.5, 0.9] {
        let rate = offline * frac;
        let count = ((rate * 20.0) as usize).clamp(20, 400); // about 20 s each
        let lat = Mutex::new(Vec::new());
        let (shed, errors) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let next = AtomicUsize::new(0);
        let start = Instant::now() + Duration::from_millis(100);
        std::thread::scope(|s| {
            for _ in 0..64 {
                s.spawn(|| {
                    let agent = ureq::AgentBuilder::new()
                        .timeout(Duration::from_secs(60))
                        .build();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= count {
                            break;
                        }
                        let at = start + Duration::from_secs_f64(i as f64 / rate);
                        if let Some(d) = at.checked_duration_since(Instant::now()) {
                            std::thread::sleep(d);
                        }
                        let code = send(&agent, &bodies[i % n]);
                        let ms = at.elapsed().as_secs_f64() * 1e3;
                        match code {
                            200 => lat.lock().unwrap().push(ms),
                            503 => {
                                shed.fetch_add(1, Ordering::Relaxed);
                            }
                            _ => {
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                });
            }
        });
        let l = lat.into_inner().unwrap();
        println!(
            "| {:.0}% | {rate:.2} | {count} | {:.0} | {:.0} | {} | {} |",
            frac * 100.0,
            pct(l.clone(), 0.5),
            pct(l, 0.99),
            shed.load(Ordering::Relaxed),
            errors.load(Ordering::Relaxed)
        );
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}
