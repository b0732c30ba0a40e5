//! `clasp store`: copy a store's catalog and vectors to another store
//! (SQLite and PostgreSQL, either way), and check one.

use super::note;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};

use super::BarProgress;
use clasp::index::postgres::PgStore;
use clasp::index::{store, ConnectOptions, Store};

#[derive(Subcommand, Debug)]
pub enum StoreCommand {
    /// Copy every model, file and vector from one store to another without re-embedding
    /// (resumable: run it again after an interruption; verified at the end).
    Copy(CopyArgs),
    /// Make a new PostgreSQL store the coordinator of shards: every model's vectors are
    /// hash-partitioned over them (postgres_fdw foreign tables, each shard with its own HNSW
    /// index); the catalog stays on the coordinator.
    Init(InitArgs),
    /// Check a store's consistency: every embeddable file has a vector for each model, and no
    /// vector is orphaned.
    Check(CheckArgs),
}

#[derive(Args, Debug)]
pub struct CopyArgs {
    /// The store to copy from: a SQLite file or a PostgreSQL URL.
    pub from: String,
    /// The store to copy into (created when missing).
    pub to: String,
    /// Seconds before a PostgreSQL connection or statement gives up.
    #[arg(long, default_value_t = 60.0)]
    pub timeout: f64,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// The coordinator: a PostgreSQL URL [default: $CLASP_STORE].
    #[arg(long)]
    pub store: Option<String>,
    /// A shard's PostgreSQL URL, with its password if it needs one (repeatable; at least two).
    #[arg(long = "shard", value_name = "URL", required = true)]
    pub shards: Vec<String>,
    /// Seconds before a PostgreSQL connection or statement gives up.
    #[arg(long, default_value_t = 60.0)]
    pub timeout: f64,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The store: a SQLite file or a PostgreSQL URL.
    pub store: String,
    /// Seconds before a PostgreSQL connection or statement gives up.
    #[arg(long, default_value_t = 60.0)]
    pub timeout: f64,
}

fn options(timeout: f64) -> Result<ConnectOptions> {
    if !(timeout > 0.0 && timeout.is_finite()) {
        bail!("--timeout must be a positive number of seconds");
    }
    Ok(ConnectOptions {
        timeout: std::time::Duration::from_secs_f64(timeout),
        ..Default::default()
    })
}

pub fn run(c: StoreCommand) -> Result<ExitCode> {
    match c {
        StoreCommand::Copy(a) => {
            let opts = options(a.timeout)?;
            let mut from = store::open(&a.from, false, &opts)?;
            let mut to = store::open(&a.to, true, &opts)?;
            let s = store::copy(from.as_mut(), to.as_mut(), &BarProgress::default())?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                note!(
                    "copied {} models, {} files, {} vectors ({} already there) from {} to {}: verified",
                    s.models,
                    s.files,
                    s.vectors,
                    s.vectors_present,
                    from.describe(),
                    to.describe()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        StoreCommand::Init(a) => {
            let Some(spec) = a.store.or_else(|| std::env::var("CLASP_STORE").ok()) else {
                bail!("give the coordinator with --store postgres://... (or CLASP_STORE)");
            };
            if !store::is_postgres(&spec) {
                bail!("{spec}: shards need a PostgreSQL store (postgres://...)");
            }
            let mut st = PgStore::connect(&spec, &options(a.timeout)?)?;
            st.init_shards(&a.shards)?;
            note!(
                "{} now shards its vectors over {} servers",
                st.describe(),
                a.shards.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        StoreCommand::Check(a) => {
            let mut st = store::open(&a.store, false, &options(a.timeout)?)?;
            let mut problems = st.check(None)?;
            for m in st.models()? {
                problems.extend(
                    st.check(Some(m.id))?
                        .into_iter()
                        .map(|p| format!("model {} ({}): {p}", m.id, m.spec)),
                );
            }
            problems.sort();
            problems.dedup();
            if problems.is_empty() {
                note!("store {} checked: consistent", st.describe());
                Ok(ExitCode::SUCCESS)
            } else {
                bail!(
                    "store {} is inconsistent: {}",
                    st.describe(),
                    problems.join("; ")
                )
            }
        }
    }
}
