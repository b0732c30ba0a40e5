//! What every handler shares: the model, the batcher, the metrics and the limits.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::batcher::Batcher;
use super::metrics::Metrics;
use crate::Encoder;

#[derive(Clone, Debug)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_items: usize,
    pub max_pixels: u64,
    pub request_timeout: Duration,
}

pub struct AppState {
    pub encoder: Arc<Encoder>,
    pub model_name: String,
    pub batcher: Batcher,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub store: Option<PathBuf>,
    pub store_model: Option<i64>,
}

pub type Shared = Arc<AppState>;
