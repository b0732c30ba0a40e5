//! `clasp index`, `clasp search` and `clasp classify`.

use super::note;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::{device, BarProgress};
use clasp::index::Embedder;
use clasp::index::{
    self, query, search, store, Catalog, ConnectOptions, IndexOptions, Store, Summary,
};
use clasp::model::blip2::Blip2Retrieval;
use clasp::preprocess::prompts;

#[derive(Args, Debug)]
pub struct StoreArgs {
    /// The store: a SQLite file, or a PostgreSQL URL (postgres://USER@HOST:PORT/DB; the password
    /// from the URL, PGPASSWORD or ~/.pgpass) [default: $CLASP_STORE, else the platform data dir].
    #[arg(long)]
    pub store: Option<String>,
    /// A PostgreSQL read replica to send searches to (repeatable); writes go to --store. One
    /// that does not answer is skipped with a warning.
    #[arg(long = "replica", value_name = "URL")]
    pub replicas: Vec<String>,
    /// A PostgreSQL store's vector type for a model it has not seen: `vector` (f32) or
    /// `halfvec` (f16: half the space; scores differ from f32 by about 1e-3).
    #[arg(long, value_name = "TYPE", default_value = "vector", value_parser = ["vector", "halfvec"])]
    pub pg_vector: String,
    /// Seconds before connecting to or querying a PostgreSQL store gives up.
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,
    /// On a sharded PostgreSQL store, answer from the shards that answer when one is down: the
    /// results are flagged partial (a warning naming the shard, exit code 1) instead of failing.
    #[arg(long)]
    pub allow_partial: bool,
    /// Images or texts per model batch.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Leave videos out of indexing. Otherwise each video (mp4, m4v, mov, mkv, webm, avi) is
    /// read through FFmpeg and indexed whole and in segments, so a search can answer
    /// `clip.mp4 @ 00:12–00:16`.
    #[arg(long)]
    pub no_video: bool,
    /// The length of an indexed video's segments, in seconds.
    #[arg(long, default_value_t = 4.0, value_name = "SECONDS")]
    pub segment_seconds: f64,
    /// Frames sampled per second of an indexed video.
    #[arg(long, default_value_t = 1.0, value_name = "FPS")]
    pub video_fps: f64,
    #[command(flatten)]
    pub compute: super::ComputeArgs,
    #[command(flatten)]
    pub resolution: super::ResolutionArgs,
}

impl StoreArgs {
    /// The store's name: --store, $CLASP_STORE, or the default SQLite file.
    pub fn spec(&self) -> String {
        self.store
            .clone()
            .or_else(|| std::env::var("CLASP_STORE").ok())
            .unwrap_or_else(|| Catalog::default_path().display().to_string())
    }

    pub fn connect_options(&self) -> Result<ConnectOptions> {
        if !(self.timeout > 0.0 && self.timeout.is_finite()) {
            bail!("--timeout must be a positive number of seconds");
        }
        Ok(ConnectOptions {
            timeout: std::time::Duration::from_secs_f64(self.timeout),
            replicas: self.replicas.clone(),
            vector_type: store::VectorType::parse(&self.pg_vector).unwrap_or_default(),
            allow_partial: self.allow_partial,
        })
    }
}

#[derive(Args, Debug)]
pub struct IndexArgs {
    /// Folders to index.
    #[arg(required = true)]
    pub dirs: Vec<PathBuf>,
    /// Model: a local directory or a Hugging Face Hub id; a BLIP-2 retrieval folder
    /// (Blip2ForImageTextRetrieval) keeps its query embeddings per image and searches by BLIP-2's
    /// ITC (the best query's cosine).
    #[arg(long, short)]
    pub model: String,
    /// Leave out paths matching this glob (relative to the folder, or absolute); repeatable.
    #[arg(long)]
    pub exclude: Vec<String>,
    #[command(flatten)]
    pub store: StoreArgs,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// After indexing, verify the store (integrity, vectors for every file, no orphans).
    #[arg(long)]
    pub check: bool,
}

#[derive(Args, Debug)]
pub struct SearchArgs {
    /// Query terms: text, image paths, `+`/`-` between terms, weights as `2:"snow"`.
    #[arg(required = true)]
    pub query: Vec<String>,
    /// Number of results.
    #[arg(short = 'k', long = "top", default_value_t = 10)]
    pub k: usize,
    /// Folder to search (indexed first unless --no-index) [default: the current directory].
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Model [default: the store's most recently used model].
    #[arg(long, short)]
    pub model: Option<String>,
    /// Print a JSON list of {"path", "score"}.
    #[arg(long)]
    pub json: bool,
    /// Print only paths, one per line.
    #[arg(long)]
    pub paths_only: bool,
    /// Search the store as it is, without indexing first.
    #[arg(long)]
    pub no_index: bool,
    /// Also search captions (sidecar .txt, EXIF description, file names) with BM25, fused by RRF.
    #[arg(long)]
    pub hybrid: bool,
    /// Use the HNSW index from this many stored vectors on (a larger number than the store
    /// holds searches exactly).
    #[arg(long, default_value_t = index::ANN_THRESHOLD)]
    pub ann_threshold: usize,
    /// HNSW's candidate list at query time (usearch's expansion, pgvector's hnsw.ef_search).
    #[arg(long)]
    pub ef_search: Option<usize>,
    /// Re-score the first stage's top K with a fusion model's image-text matching head
    /// (--rerank-model, or --model when that is a BLIP-2 folder): `itm[:K]` orders by its match
    /// probability, `itm+sim[:K]` by its match logit plus the first stage's similarity (ALBEF's
    /// and BLIP's practice) [K: 32].
    #[arg(long)]
    pub rerank: Option<index::rerank::Rerank>,
    /// The fusion model for --rerank: a Blip2ForImageTextRetrieval folder.
    #[arg(long, requires = "rerank")]
    pub rerank_model: Option<PathBuf>,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Args, Debug)]
pub struct ClassifyArgs {
    /// Folder whose images to label (indexed first).
    pub dir: PathBuf,
    /// Comma-separated labels.
    #[arg(long, required_unless_present = "imagenet", value_delimiter = ',')]
    pub labels: Vec<String>,
    /// Label with a pretrained ImageNet classifier's own 1000 classes instead of zero-shot
    /// labels: torchvision's MobileNetV2 or ResNet, or EfficientNet-Lite (`.pth` or
    /// safetensors; `scripts/get-model.sh mobilenet_v2|efficientnet_lite0`). Reads the folder
    /// directly; no store.
    #[arg(long, conflicts_with_all = ["labels", "templates", "model", "no_index"])]
    pub imagenet: Option<PathBuf>,
    /// Prompt templates, one per line with `{}` [default: openai's 18 CIFAR templates, Chinese with a Chinese model].
    #[arg(long)]
    pub templates: Option<PathBuf>,
    /// Model [default: the store's most recently used model].
    #[arg(long, short)]
    pub model: Option<String>,
    /// Print a JSON list of {"path", "label", "probability"}.
    #[arg(long)]
    pub json: bool,
    /// Label the store as it is, without indexing the folder first.
    #[arg(long)]
    pub no_index: bool,
    #[command(flatten)]
    pub store: StoreArgs,
}

/// The store: created when `create` (indexing comes first), else it must
/// exist.
pub(super) fn open_store(a: &StoreArgs, create: bool) -> Result<Box<dyn Store>> {
    Ok(store::open(&a.spec(), create, &a.connect_options()?)?)
}

/// The model named by `--model` or `CLASP_MODEL`, if either is set.
fn given_model(arg: &Option<String>) -> Option<String> {
    arg.clone().or_else(|| std::env::var("CLASP_MODEL").ok())
}

pub(super) fn model_spec(arg: &Option<String>, catalog: &mut dyn Store) -> Result<String> {
    if let Some(m) = given_model(arg) {
        return Ok(m);
    }
    match catalog.last_model_spec()? {
        Some(m) => {
            tracing::info!(model = %m, "using the model the store was last indexed with");
            if m.starts_with('/') && !Path::new(&m).is_dir() {
                bail!(
                    "the store {} was indexed with the model {m}, which is no longer there; pass --model",
                    catalog.describe()
                );
            }
            Ok(m)
        }
        None => bail!(
            "no model given and the store {} has none yet; pass --model DIR_OR_HUB_ID",
            catalog.describe()
        ),
    }
}

fn print_summary(s: &Summary, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(s).unwrap_or_default());
    } else {
        note!(
            "added {}, updated {}, moved {}, removed {}, unchanged {}, failed {}, skipped {} ({} embedded, {} video segments)",
            s.added,
            s.updated,
            s.moved,
            s.removed,
            s.unchanged,
            s.failed.len(),
            s.skipped.len(),
            s.embedded,
            s.segments
        );
    }
    for (p, why) in &s.failed {
        if why.contains(p.as_str()) {
            eprintln!("  failed:  {why}");
        } else {
            eprintln!("  failed:  {p}: {why}");
        }
    }
    for (p, why) in &s.skipped {
        eprintln!("  skipped: {p}: {why}");
    }
}

/// Searches index first; they mention what changed, and stay quiet otherwise.
fn note_changes(s: &Summary) {
    if s.added + s.updated + s.moved + s.removed > 0 {
        note!(
            "indexed: added {}, updated {}, moved {}, removed {} ({} failed; `clasp index` lists them)",
            s.added,
            s.updated,
            s.moved,
            s.removed,
            s.failed.len()
        );
    }
}

fn run_index(
    catalog: &mut dyn Store,
    encoder: &dyn Embedder,
    model_id: i64,
    dirs: &[PathBuf],
    excludes: &[String],
    store: &StoreArgs,
) -> Result<Summary> {
    let bar = BarProgress::default();
    let opts = IndexOptions {
        batch_size: store.batch_size,
        excludes: excludes.to_vec(),
        video: (!store.no_video).then_some(index::VideoOptions {
            segment_seconds: store.segment_seconds,
            fps: store.video_fps,
        }),
    };
    Ok(index::index(catalog, encoder, model_id, dirs, &opts, &bar)?)
}

pub fn index_cmd(a: IndexArgs) -> Result<ExitCode> {
    // The model first: a wrong one must not leave a new, empty store behind.
    let encoder = super::load_embedder(
        &a.model,
        &device(a.store.compute.device)?,
        clasp::model::Towers::Both,
        a.store.compute.precision,
        &a.store.resolution,
    )?;
    let mut catalog = open_store(&a.store, true)?;
    let model_id = index::model_id(catalog.as_mut(), encoder.as_ref(), &a.model)?;
    let s = run_index(
        catalog.as_mut(),
        encoder.as_ref(),
        model_id,
        &a.dirs,
        &a.exclude,
        &a.store,
    )?;
    print_summary(&s, a.json);
    if a.check {
        let problems = catalog.check(Some(model_id))?;
        if !problems.is_empty() {
            bail!(
                "store {} is inconsistent: {}",
                catalog.describe(),
                problems.join("; ")
            );
        }
        note!("store {} checked: consistent", catalog.describe());
    }
    Ok(if s.failed.is_empty() && s.skipped.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn search_dir(arg: &Option<PathBuf>) -> Result<PathBuf> {
    match arg {
        Some(d) => Ok(d.clone()),
        None => std::env::current_dir().context("current directory"),
    }
}

/// The store, the model and its id in the store.
type Opened = (Box<dyn Store>, Box<dyn Embedder>, i64);

/// What `search` and `classify` share: the store, the model (given or the
/// store's last), its id, and an incremental index of `dir` first unless
/// `no_index`.
fn open_and_index(
    store: &StoreArgs,
    model: &Option<String>,
    dir: &Path,
    no_index: bool,
    text_only: bool,
) -> Result<Opened> {
    // Without an index run, a process that embeds only texts loads only the
    // text tower (a cold text search reads less than half of ViT-B/32).
    let towers = if no_index && text_only {
        clasp::model::Towers::Text
    } else {
        clasp::model::Towers::Both
    };
    // A given model loads before the store is opened (and perhaps created),
    // so a wrong one leaves nothing behind; otherwise the store names it.
    let (mut catalog, spec, encoder) = match given_model(model) {
        Some(spec) => {
            let encoder = super::load_embedder(
                &spec,
                &device(store.compute.device)?,
                towers,
                store.compute.precision,
                &store.resolution,
            )?;
            (open_store(store, !no_index)?, spec, encoder)
        }
        None => {
            // A missing SQLite file says how to go on; a server that cannot
            // be reached says so plainly.
            let mut catalog = open_store(store, false).map_err(|e| {
                if store::is_postgres(&store.spec()) {
                    e
                } else {
                    anyhow::anyhow!("no model given, and no store to take one from ({e}); pass --model DIR_OR_HUB_ID")
                }
            })?;
            let spec = model_spec(model, catalog.as_mut())?;
            let encoder = super::load_embedder(
                &spec,
                &device(store.compute.device)?,
                towers,
                store.compute.precision,
                &store.resolution,
            )?;
            (catalog, spec, encoder)
        }
    };
    let model_id = index::model_id(catalog.as_mut(), encoder.as_ref(), &spec)?;
    if !no_index {
        let dirs = [dir.to_path_buf()];
        let s = run_index(
            catalog.as_mut(),
            encoder.as_ref(),
            model_id,
            &dirs,
            &[],
            store,
        )?;
        note_changes(&s);
    }
    Ok((catalog, encoder, model_id))
}

/// The fusion model of `--rerank-model`.
fn load_fusion(m: &Path, store: &StoreArgs) -> Result<Blip2Retrieval> {
    if !clasp::model::blip2::is_blip2_dir(m) {
        bail!(
            "--rerank-model {}: not a fusion model (a Blip2ForImageTextRetrieval folder, config.json model_type \"blip-2\")",
            m.display()
        );
    }
    Blip2Retrieval::load(m, &super::device(store.compute.device)?)
        .with_context(|| format!("--rerank-model {}", m.display()))
}

pub fn search_cmd(a: SearchArgs) -> Result<ExitCode> {
    if a.k == 0 {
        bail!("-k must be at least 1");
    }
    // The query parses before a model loads or a folder is indexed.
    let terms = query::parse(&a.query)?;
    // --rerank's cheap checks come first: the query must be one text, and a
    // fusion model must be named (--rerank-model, or a BLIP-2 --model).
    let rerank = match &a.rerank {
        Some(r) => {
            let (texts, images): (Vec<_>, Vec<_>) = terms
                .iter()
                .partition(|t| matches!(t.kind, query::TermKind::Text(_)));
            let texts: Vec<String> = texts
                .iter()
                .filter_map(|t| match &t.kind {
                    query::TermKind::Text(s) if t.weight > 0.0 => Some(s.clone()),
                    _ => None,
                })
                .collect();
            let text = index::rerank::check_query(&texts, images.len())?;
            let own = given_model(&a.model)
                .is_some_and(|m| clasp::model::blip2::is_blip2_dir(Path::new(&m)));
            let model = match &a.rerank_model {
                Some(m) => Some(load_fusion(m, &a.store)?),
                None if own || given_model(&a.model).is_none() => None,
                None => bail!(
                    "--rerank needs a fusion model: --rerank-model DIR (a Blip2ForImageTextRetrieval folder), or such a folder as --model"
                ),
            };
            Some((*r, model, text))
        }
        None => None,
    };
    let dir = search_dir(&a.dir)?;
    let text_only = terms
        .iter()
        .all(|t| matches!(t.kind, query::TermKind::Text(_)));
    let (mut catalog, encoder, model_id) =
        open_and_index(&a.store, &a.model, &dir, a.no_index, text_only)?;
    let dirs = vec![index::indexer::canonical_prefix(&dir)?];
    let q = query::embed(encoder.as_ref(), &terms)?;
    // HNSW holds one vector per image: a multi-vector model is searched exactly.
    let threshold = if encoder.vectors_per_image() > 1 {
        usize::MAX
    } else {
        a.ann_threshold
    };
    let engine = catalog.engine(model_id, threshold)?;
    if let Some(ef) = a.ef_search {
        engine.set_ef_search(ef);
    }
    tracing::info!(engine = engine.name(), vectors = engine.len(), "searching");
    let hits = if a.hybrid {
        let text: Vec<String> = terms
            .iter()
            .filter(|t| t.weight > 0.0)
            .filter_map(|t| match &t.kind {
                query::TermKind::Text(s) => Some(s.clone()),
                query::TermKind::Image(_) => None,
            })
            .collect();
        search::hybrid_search(
            engine.as_ref(),
            catalog.as_mut(),
            &q,
            &text.join(" "),
            a.k,
            &dirs,
        )?
    } else {
        let k = rerank.as_ref().map_or(a.k, |(r, ..)| r.candidates.max(a.k));
        search::vector_search(engine.as_ref(), catalog.as_mut(), &q, k, &dirs)?
    };
    let hits = match &rerank {
        Some((r, model, text)) => {
            let Some(model) = model.as_ref().or(encoder.fusion()) else {
                bail!(
                    "--rerank needs a fusion model: --rerank-model DIR (a Blip2ForImageTextRetrieval folder); the store's model is a dual encoder"
                );
            };
            let mut h = index::rerank::rerank(model, text, hits, r.score)?;
            h.truncate(a.k);
            h
        }
        None => hits,
    };
    if hits.is_empty() {
        note!("no results: no indexed images under {}", dir.display());
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&hits)?);
    } else if a.paths_only {
        // A segment as stored: the video's path with its `#t=START,END`.
        for h in &hits {
            println!("{}", h.stored_path());
        }
    } else {
        for h in &hits {
            match h.itm {
                Some(itm) => println!("{:.4}\t{itm:.4}\t{}", h.score, h.display()),
                None => println!("{:.4}\t{}", h.score, h.display()),
            }
        }
    }
    let missing = engine.unanswered();
    if !missing.is_empty() {
        note!(
            "partial results: {} did not answer (--allow-partial)",
            missing.join(", ")
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn classify_cmd(a: ClassifyArgs) -> Result<ExitCode> {
    if let Some(m) = &a.imagenet {
        return super::imagenet::classify(m, &a.dir, a.json);
    }
    let labels: Vec<String> = a
        .labels
        .iter()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    if labels.len() < 2 {
        bail!("--labels needs at least two labels, e.g. --labels cat,dog");
    }
    // The cheap checks first: before a model loads or a folder is indexed.
    let custom: Option<Vec<String>> = match &a.templates {
        Some(p) => {
            let t: Vec<String> = std::fs::read_to_string(p)
                .with_context(|| p.display().to_string())?
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect();
            if t.is_empty() {
                bail!("{}: no templates in the file", p.display());
            }
            Some(t)
        }
        None => None,
    };
    let (mut catalog, encoder, model_id) =
        open_and_index(&a.store, &a.model, &a.dir, a.no_index, true)?;
    let encoder = encoder.dual("clasp classify")?;
    let templates = custom.unwrap_or_else(|| {
        prompts::default_templates(matches!(
            encoder.config(),
            clasp::model::ModelConfig::ChineseClip(_)
        ))
    });
    let dirs = vec![index::indexer::canonical_prefix(&a.dir)?];
    let out = search::classify(
        encoder,
        catalog.as_mut(),
        model_id,
        &labels,
        &templates,
        &dirs,
    )?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for l in &out {
            println!("{}\t{:.3}\t{}", l.label, l.probability, l.path);
        }
    }
    Ok(ExitCode::SUCCESS)
}
