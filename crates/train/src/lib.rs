//! Training: the objectives and their schedules, the trainable model and its
//! checkpoints, the optimiser, and the loop that runs them.
//!
//! - `config`: the run's typed configuration (its `Default` holds the defaults);
//! - `trainer`: the loop as an object, with hooks for evaluation;
//! - `order` and `state`: the data order and the saved run state;
//! - `objectives` (one file each, with a registry) and `schedule`;
//! - `step`: one batch's forward and backward; `optim`, `ewc`, `mine`;
//! - `feature_cache`: a locked image tower run once per image;
//! - `vlm`: vision-language runs, with `bcif`'s contrastive branch.

use clasp_common::{atomic, device, progress, rng, vecmath};
pub use clasp_common::{Error, Result};
use clasp_core::{data, encoder, preprocess, Encoder};
use clasp_llm as llm;

pub mod bcif;
pub mod config;
pub mod dist;
pub mod dpo;
pub mod ewc;
pub mod feature_cache;
pub mod hooks;
pub mod mine;
pub mod model;
mod momentum;
pub mod native_task;
pub mod objectives;
pub mod optim;
pub mod order;
pub mod preference_task;
pub mod prefs;
pub mod prefs_build;
pub mod presets;
pub mod qformer_init;
pub mod qformer_stage1;
pub mod qformer_task;
pub mod reward;
pub mod run;
pub mod schedule;
pub mod state;
pub mod step;
mod teacher;
pub mod trainer;
pub mod vlm;
pub mod vq;
