//! What a training run reports and what its caller plugs in: the per-step
//! log (one line of metrics.jsonl), the outcome, progress, and the dev
//! evaluation hook (which keeps `train` free of `eval`).

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::data::PairSet;
use crate::progress::Progress;
use crate::Result;

/// One line of metrics.jsonl.
#[derive(Clone, Debug, Serialize)]
pub struct StepLog {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    pub temperature: f64,
    pub images_per_s: f64,
    /// Per-module gradient norms before clipping, when per-module clipping is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_grad_norms: Option<std::collections::BTreeMap<String, f64>>,
    /// Cosine between the first two objectives' gradients on the probed group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_conflict: Option<f64>,
    /// Each part of a combined objective, unweighted, and the weights in
    /// force (vision-language runs: `lm`, the contrastive parts, `lambda`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub losses: Option<std::collections::BTreeMap<String, f64>>,
    /// Images of the batch that could not be read, skipped (with the error).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dev: Option<serde_json::Value>,
    /// Under data parallelism: this step's seconds in collective operations
    /// (gathers and all-reduces, waiting for the slowest rank included).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm_s: Option<f64>,
    /// Seconds this step waited for its images to be prepared (near 0 while
    /// the loader keeps ahead of the model).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_wait_s: Option<f64>,
}

pub struct TrainOutcome {
    pub steps_done: usize,
    pub interrupted: bool,
    pub last_loss: f64,
    pub dev: Option<serde_json::Value>,
    pub checkpoint: PathBuf,
}

/// Progress during training, beyond the plain bar.
pub trait TrainProgress: Progress {
    fn step(&self, log: &StepLog);
}

/// Dev metrics of a saved checkpoint on the dev set (e.g. `clasp eval`'s
/// retrieval metrics).
pub type EvalHook<'a> = &'a dyn Fn(&Path, &PairSet) -> Result<serde_json::Value>;

/// What the caller plugs into a run.
pub struct Hooks<'a> {
    pub progress: &'a dyn TrainProgress,
    /// Needed when the config names an `eval_dataset`.
    pub evaluate: Option<EvalHook<'a>>,
}

/// Appends a step's line to metrics.jsonl and shows it.
pub fn record(
    metrics: &mut std::fs::File,
    path: &Path,
    log: &StepLog,
    progress: &dyn TrainProgress,
) -> Result<()> {
    use std::io::Write;
    writeln!(
        metrics,
        "{}",
        serde_json::to_string(log).expect("log serialises")
    )
    .map_err(|e| crate::Error::io(path, e))?;
    progress.step(log);
    progress.inc(1);
    Ok(())
}
