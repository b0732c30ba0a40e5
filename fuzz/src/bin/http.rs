//! The HTTP JSON bodies of the embedding server, through its real router
//! (the tiny test model answers): the first byte picks the endpoint, the
//! rest is the body.
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use clasp::serve::{api, metrics::Metrics, router, BatchConfig, Batcher, Limits};
use tower::ServiceExt;

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let encoder = Arc::new(
        clasp::Encoder::load(
            root.join("tests/fixtures/core/tiny-clip").to_str().unwrap(),
            &candle_core::Device::Cpu,
        )
        .unwrap(),
    );
    let app = rt.block_on(async {
        let metrics = Arc::new(Metrics::new());
        let batcher = Batcher::start(
            encoder.clone(),
            BatchConfig {
                max_batch_size: 8,
                max_wait: Duration::from_millis(1),
                max_queue: 64,
            },
            metrics.clone(),
        );
        router(Arc::new(api::AppState {
            encoder,
            model_name: "tiny".into(),
            batcher,
            metrics,
            limits: Limits {
                max_body_bytes: 1 << 20,
                max_items: 16,
                max_pixels: 1 << 20,
                request_timeout: Duration::from_secs(5),
            },
            store: None,
            store_model: None,
            search: Default::default(),
            thumbs: Default::default(),
        }))
    });
    // The router and the runtime are shared by every input; a panic ends the
    // process (AFL counts it), so unwind safety does not matter here.
    let (app, rt) = (
        std::panic::AssertUnwindSafe(app),
        std::panic::AssertUnwindSafe(rt),
    );
    afl::fuzz!(|data: &[u8]| {
        let Some((&pick, body)) = data.split_first() else {
            return;
        };
        let path = ["/v1/embeddings", "/v1/similarity", "/v1/classify", "/v1/search"][pick as usize % 4];
        let req = axum::http::Request::post(path)
            .header("content-type", "application/json")
            .body(Body::from(body.to_vec()))
            .unwrap();
        let status = rt.block_on(async { (*app).clone().oneshot(req).await.unwrap().status() });
        // Whatever the body, the server answers it: never a 500.
        assert!(status.as_u16() < 500 || status.as_u16() == 503, "{path}: {status}");
    });
}
