//! `clasp serve` under load: batching equals unbatched results, disconnects, shutdown, slow and
//! oversized bodies, the openai client, and method errors.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::{json, Value};

mod common;
mod serve_util;

use serve_util::*;

#[test]
fn concurrent_requests_are_batched_and_equal_unbatched_results() {
    let texts: Vec<String> = (0..24)
        .map(|i| format!("caption number {i} of a photo"))
        .collect();
    // Unbatched reference: a server that never batches.
    let single = server(&["--max-batch-size", "1", "--max-wait-ms", "0"]);
    let reference: Vec<Vec<f32>> = texts
        .iter()
        .map(|t| vecs(&single.post("/v1/embeddings", &json!({"input": t})).1).remove(0))
        .collect();
    let img_ref = vecs(
        &single
            .post("/v1/embeddings", &json!({"images": [b64("rgb.png")]}))
            .1,
    );
    drop(single);

    let s = server(&["--max-batch-size", "32", "--max-wait-ms", "200"]);
    let base = s.base.clone();
    let handles: Vec<_> = texts
        .iter()
        .cloned()
        .map(|t| {
            let base = base.clone();
            std::thread::spawn(move || {
                let v: Value = ureq::post(&format!("{base}/v1/embeddings"))
                    .send_json(json!({"input": t}))
                    .unwrap()
                    .into_json()
                    .unwrap();
                vecs(&v).remove(0)
            })
        })
        .collect();
    let img_handles: Vec<_> = (0..6)
        .map(|_| {
            let base = base.clone();
            let img = b64("rgb.png");
            std::thread::spawn(move || {
                let v: Value = ureq::post(&format!("{base}/v1/embeddings"))
                    .send_json(json!({"images": [img]}))
                    .unwrap()
                    .into_json()
                    .unwrap();
                vecs(&v)
            })
        })
        .collect();
    let batched: Vec<Vec<f32>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(
        max_abs(&batched, &reference) < 1e-5,
        "batched texts equal unbatched"
    );
    for h in img_handles {
        assert!(
            max_abs(&h.join().unwrap(), &img_ref) < 1e-5,
            "batched images equal unbatched"
        );
    }
    let (sum, count) = (
        s.metric("clasp_batch_size_sum{kind=\"text\"}"),
        s.metric("clasp_batch_size_count{kind=\"text\"}"),
    );
    assert_eq!(sum, 24.0);
    assert!(
        count < 24.0 && sum / count > 1.0,
        "texts were batched: {count} batches for 24 items"
    );
    let (isum, icount) = (
        s.metric("clasp_batch_size_sum{kind=\"image\"}"),
        s.metric("clasp_batch_size_count{kind=\"image\"}"),
    );
    assert!(
        isum == 6.0 && icount < 6.0,
        "images were batched: {icount} batches"
    );
}

#[test]
fn disconnected_clients_are_dropped_and_shutdown_drains() {
    let mut s = server(&["--max-batch-size", "64", "--max-wait-ms", "1500"]);
    // A client that sends a request and leaves before its batch is cut.
    {
        let mut c = TcpStream::connect(&s.addr).unwrap();
        let body = "{\"input\": \"gone\"}";
        write!(c, "POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        std::thread::sleep(Duration::from_millis(200));
    } // closed
      // The queue task drops it when it next looks at the queue (at the latest
      // when the batch is due); the compute counter must not see it.
    let t0 = std::time::Instant::now();
    while s.metric("clasp_dropped_disconnected_total") < 1.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the disconnected client's item was never dropped"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        s.metric("clasp_batch_size_count{kind=\"text\"}"),
        0.0,
        "nothing was computed for it"
    );
    // A request in flight when SIGTERM arrives still gets its answer.
    let base = s.base.clone();
    let inflight = std::thread::spawn(move || {
        ureq::post(&format!("{base}/v1/embeddings"))
            .send_json(json!({"input": "stay"}))
            .map(|r| r.status())
            .ok()
    });
    std::thread::sleep(Duration::from_millis(300)); // queued, waiting out max-wait
    common::signal(&s.child, common::SIGTERM);
    assert_eq!(
        inflight.join().unwrap(),
        Some(200),
        "in-flight request drained"
    );
    let status = s.child.wait().unwrap();
    assert!(status.success(), "clean exit after draining: {status:?}");
}

#[test]
fn a_client_too_slow_to_send_its_body_is_timed_out() {
    // A server of its own: a short timeout on a loaded CI machine must not
    // catch the other error tests' requests.
    let s = server(&["--timeout-ms", "300"]);
    let mut c = TcpStream::connect(&s.addr).unwrap();
    c.write_all(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"input\"").unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 512];
    let n = c.read(&mut buf).unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert!(s.metric("clasp_errors_total{class=\"timeout\"}") >= 1.0);
}

#[test]
fn an_over_limit_body_still_gets_its_413_when_it_arrives_in_pieces() {
    // A client that writes its whole body before reading the answer, with the
    // tail of the body arriving after the server has seen the limit pass. If
    // the server answered and closed at the limit, the tail would meet a
    // closed socket and the client would see a reset instead of the 413.
    let s = server(&["--max-body-mb", "1"]);
    let mut c = TcpStream::connect(&s.addr).unwrap();
    let len = 1_600_000;
    write!(c, "POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n").unwrap();
    c.write_all(&vec![b' '; 1_200_000]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // The tail in small writes, as a slow client sends it: a write after the
    // server has closed and reset the connection fails with a broken pipe.
    for chunk in vec![b' '; len - 1_200_000].chunks(8192) {
        c.write_all(chunk)
            .expect("the server closed the connection before reading the body's tail");
        std::thread::sleep(Duration::from_millis(2));
    }
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = Vec::new();
    c.read_to_end(&mut head)
        .or_else(|e| if head.is_empty() { Err(e) } else { Ok(0) })
        .expect("the answer to an over-limit body");
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(head.contains("body_too_large"), "{head}");
}

/// The official `openai` package's default embeddings call (it asks for
/// base64) gets the vectors `clasp embed` writes; `dimensions` truncates and
/// renormalises; usage counts the text tower's tokens.
#[test]
fn the_openai_client_embeds_with_its_defaults_and_dimensions() {
    let s = server(&[]);
    let r = common::python_client("openai_embeddings_check.py", &[&s.base]);
    let texts = ["a dog", "a photo of a cat on a sofa"];
    let (offline, _) = clasp_embed(&texts, &[]);
    let got: Vec<Vec<f32>> = r["default"]
        .as_array()
        .unwrap()
        .iter()
        .map(common::f32s)
        .collect();
    assert!(
        max_abs(&got, &offline) <= 1e-6,
        "{}",
        max_abs(&got, &offline)
    );
    for (v, full) in r["dims8"].as_array().unwrap().iter().zip(&offline) {
        let v = common::f32s(v);
        assert_eq!(v.len(), 8);
        let n = full[..8].iter().map(|x| x * x).sum::<f32>().sqrt();
        for (a, b) in v.iter().zip(&full[..8]) {
            assert!((a - b / n).abs() <= 1e-6);
        }
    }
    // Each text's tokens with the start and end tokens, as the tokenizer counts them.
    let tok = clasp::Encoder::load(&tiny(), &candle_core::Device::Cpu).unwrap();
    let batch = tok.tokenizer().encode(&texts).unwrap();
    let want: usize = batch
        .mask
        .iter()
        .map(|m| m.iter().filter(|&&x| x != 0).count())
        .sum();
    assert_eq!(r["prompt_tokens"], want);
}

/// A GET on a POST endpoint gets a 405 with the JSON error shape; /health
/// names the model without the server's absolute path.
#[test]
fn wrong_methods_get_a_json_405_and_health_hides_the_model_path() {
    let s = server(&[]);
    let r = ureq::get(&format!("{}/v1/embeddings", s.base)).call();
    let Err(ureq::Error::Status(405, r)) = r else {
        panic!("GET /v1/embeddings should be 405");
    };
    let v: Value = r.into_json().unwrap();
    assert_eq!(v["error"]["type"], "method_not_allowed", "{v}");
    let h: Value = serde_json::from_str(&s.get("/health")).unwrap();
    assert_eq!(h["model"], "tiny-clip", "{h}");
}
