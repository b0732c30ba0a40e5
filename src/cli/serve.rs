//! `clasp serve`.

use super::note;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::Args;

use super::device;
use clasp::serve::{
    self, BatchConfig, ChatConfig, ChatModelKind, GenConfig, Limits, ServeConfig, StoreSpec,
};
use clasp::vlm::Vlm;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Embedding model: a local directory or a Hugging Face Hub id (serves
    /// /v1/embeddings, /v1/similarity, /v1/classify and /v1/search).
    #[arg(long, short, required_unless_present_any = ["vlm", "llm"])]
    pub model: Option<String>,
    /// Vision-language model (a checkpoint from `clasp assemble` or `clasp
    /// train --stage`): serves OpenAI's /v1/chat/completions, with
    /// continuous batching. A native model (`clasp assemble --native`) also
    /// serves /v1/images/generations.
    #[arg(long, conflicts_with = "llm")]
    pub vlm: Option<PathBuf>,
    /// A language model alone (a .gguf file, a folder holding one, or a LlamaForCausalLM
    /// folder): serves /v1/chat/completions for text conversations, with continuous batching.
    #[arg(long)]
    pub llm: Option<PathBuf>,
    /// How --llm holds its weights: `quantized` (the GGUF's own, fast) or `f32`.
    #[arg(long, value_enum, default_value = "quantized", requires = "llm")]
    pub llm_precision: super::generate::PrecisionArg,
    /// Chat requests may name local images (`file://` or absolute paths)
    /// under this folder; without it only data URLs are read.
    #[arg(long, value_name = "DIR", requires = "vlm")]
    pub allow_local_images: Option<PathBuf>,
    /// A fusion model (a Blip2ForImageTextRetrieval folder) with which `/v1/search` re-ranks its
    /// top hits when a request asks (`"rerank": "itm:32"`).
    #[arg(long, value_name = "DIR", requires = "store")]
    pub rerank_model: Option<PathBuf>,
    /// A store built by `clasp index` (enables /v1/search): a SQLite file or a PostgreSQL URL.
    #[arg(long)]
    pub store: Option<String>,
    /// A PostgreSQL read replica for searches (repeatable).
    #[arg(long = "replica", value_name = "URL", requires = "store")]
    pub replicas: Vec<String>,
    /// On a sharded PostgreSQL store, answer searches from the shards that answer when one is
    /// down, flagged `"partial": true` with the missing shards, instead of failing.
    #[arg(long, requires = "store")]
    pub allow_partial: bool,
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// Largest model batch (embeddings: items per batch; chat: sequences
    /// decoded together).
    #[arg(long, default_value_t = 32)]
    pub max_batch_size: usize,
    /// Chat: prompt tokens prefilled per decode step, so a long prompt arriving holds the running
    /// answers up by one chunk per step, not its whole prefill (0: each prompt at once).
    #[arg(long, default_value_t = 128, value_name = "TOKENS")]
    pub prefill_chunk: usize,
    /// Longest an item waits for its batch to fill, in ms (chat: when no
    /// batch is running; later requests join the running batch).
    #[arg(long, default_value_t = 5)]
    pub max_wait_ms: u64,
    /// Items (chat: requests) queued at most; past it requests get 503
    /// with Retry-After.
    #[arg(long, default_value_t = 1024)]
    pub max_queue: usize,
    /// Items in one request at most: texts + images (classify: images +
    /// labels, not the prompts they expand to).
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
    #[command(flatten)]
    pub compute: super::ComputeArgs,
    #[command(flatten)]
    pub resolution: super::ResolutionArgs,
}

pub fn run(a: ServeArgs) -> Result<ExitCode> {
    let dev = device(a.compute.device)?;
    let encoder = a
        .model
        .as_deref()
        .map(|m| {
            super::load_encoder(
                m,
                &dev,
                clasp::model::Towers::Both,
                a.compute.precision,
                &a.resolution,
            )
        })
        .transpose()?;
    let store = a.store.as_ref().map(|spec| StoreSpec {
        spec: spec.clone(),
        options: clasp::index::ConnectOptions {
            timeout: Duration::from_millis(a.timeout_ms.max(1)),
            replicas: a.replicas.clone(),
            allow_partial: a.allow_partial,
            ..Default::default()
        },
    });
    let store_model = match (&store, &encoder, &a.model) {
        (Some(s), Some(encoder), Some(name)) => {
            let mut catalog = clasp::index::store::open(&s.spec, false, &s.options)?;
            Some(clasp::index::model_id(catalog.as_mut(), encoder, name)?)
        }
        (Some(_), None, _) => anyhow::bail!("--store needs an embedding model (--model)"),
        _ => None,
    };
    let max_wait = Duration::from_millis(a.max_wait_ms);
    let chat = match a.vlm.as_ref().or(a.llm.as_ref()) {
        Some(p) => Some(ChatConfig {
            vlm: if a.llm.is_some() {
                let lm = clasp::llm::LanguageModel::load(p, a.llm_precision.into(), &dev)?;
                ChatModelKind::Text(Box::new(clasp::vlm::TextChat {
                    llm: lm.model,
                    tokenizer: lm.tokenizer,
                }))
            } else if clasp::vlm::native::is_native(p) {
                ChatModelKind::Native(Box::new(clasp::vlm::native::NativeModel::load(p, &dev)?))
            } else {
                ChatModelKind::Bridge(Box::new(Vlm::load(p, &dev)?))
            },
            model_name: public_name(&p.display().to_string()),
            engine: GenConfig {
                max_batch_size: a.max_batch_size.max(1),
                prefill_chunk: a.prefill_chunk,
                max_wait,
                max_queue: a.max_queue.max(1),
            },
            local_images: a.allow_local_images.clone(),
        }),
        None => None,
    };
    let cfg = ServeConfig {
        addr: a.addr,
        model_name: a.model.as_deref().map(public_name).unwrap_or_default(),
        batch: BatchConfig {
            max_batch_size: a.max_batch_size.max(1),
            max_wait,
            max_queue: a.max_queue.max(1),
        },
        limits: Limits {
            max_body_bytes: a.max_body_mb * 1024 * 1024,
            max_items: a.max_items.max(1),
            max_pixels: a.max_pixels,
            request_timeout: Duration::from_millis(a.timeout_ms),
        },
        store,
        store_model,
        reranker: match &a.rerank_model {
            Some(m) if !clasp::model::blip2::is_blip2_dir(m) => anyhow::bail!(
                "--rerank-model {}: not a fusion model (a Blip2ForImageTextRetrieval folder)",
                m.display()
            ),
            Some(m) => Some(clasp::model::blip2::Blip2Retrieval::load(m, &dev)?),
            None => None,
        },
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
            note!("shutting down: draining requests in flight");
        };
        serve::serve(encoder, chat, cfg, shutdown, |addr| {
            // Always printed, even under -q: it is where the server is.
            eprintln!("listening on http://{addr}")
        })
        .await
    })?;
    Ok(ExitCode::SUCCESS)
}

/// The name the server shows for a model: a Hub id as given, a local folder
/// by its own name (with its parent's when it is a run's `checkpoint`), never
/// the server's absolute path.
fn public_name(spec: &str) -> String {
    let p = std::path::Path::new(spec);
    if !p.exists() {
        return spec.to_string();
    }
    let name = |p: &std::path::Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let last = name(p);
    match p.parent() {
        Some(parent) if last == "checkpoint" && !name(parent).is_empty() => {
            format!("{}/{last}", name(parent))
        }
        _ => last,
    }
}
