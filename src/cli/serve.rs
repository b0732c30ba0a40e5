//! `clasp serve`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::Args;

use super::{device, DeviceArg};
use clasp::serve::{self, BatchConfig, Limits, ServeConfig};
use clasp::Encoder;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Model: a local directory or a Hugging Face Hub id.
    #[arg(long, short)]
    pub model: String,
    /// A store built by `clasp index` (enables /v1/search).
    #[arg(long)]
    pub store: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// Largest model batch.
    #[arg(long, default_value_t = 32)]
    pub max_batch_size: usize,
    /// Longest an item waits for its batch to fill, in ms.
    #[arg(long, default_value_t = 5)]
    pub max_wait_ms: u64,
    /// Items queued at most; past it requests get 503 with Retry-After.
    #[arg(long, default_value_t = 1024)]
    pub max_queue: usize,
    /// Items (texts + images) in one request at most.
    #[arg(long, default_value_t = 256)]
    pub max_items: usize,
    /// Request body limit in MiB.
    #[arg(long, default_value_t = 32)]
    pub max_body_mb: usize,
    /// Pixels per image at most (decompression-bomb guard).
    #[arg(long, default_value_t = 50_000_000)]
    pub max_pixels: u64,
    /// Request timeout in ms.
    #[arg(long, default_value_t = 30_000)]
    pub timeout_ms: u64,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
}

pub fn run(a: ServeArgs) -> Result<ExitCode> {
    let encoder = Encoder::load(&a.model, &device(a.device)?)?;
    let store_model = match &a.store {
        Some(p) => {
            let catalog = clasp::index::Catalog::open(p)?;
            Some(clasp::index::model_id(&catalog, &encoder, &a.model)?)
        }
        None => None,
    };
    let cfg = ServeConfig {
        addr: a.addr,
        model_name: a.model.clone(),
        batch: BatchConfig {
            max_batch_size: a.max_batch_size.max(1),
            max_wait: Duration::from_millis(a.max_wait_ms),
            max_queue: a.max_queue.max(1),
        },
        limits: Limits {
            max_body_bytes: a.max_body_mb * 1024 * 1024,
            max_items: a.max_items.max(1),
            max_pixels: a.max_pixels,
            request_timeout: Duration::from_millis(a.timeout_ms),
        },
        store: a.store.clone(),
        store_model,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let shutdown = async {
            let ctrl_c = tokio::signal::ctrl_c();
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
            eprintln!("shutting down: draining requests in flight");
        };
        serve::serve(encoder, cfg, shutdown, |addr| {
            eprintln!("listening on http://{addr}")
        })
        .await
    })?;
    Ok(ExitCode::SUCCESS)
}
