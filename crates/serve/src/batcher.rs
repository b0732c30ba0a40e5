//! The dynamic batching engine, after text-embeddings-inference's
//! `core/src/queue.rs`: one task owns all queue state; handlers only send it
//! jobs, and the model worker only asks it for the next batch.
//!
//! - Images and texts wait in separate queues (a batch is one modality).
//! - A batch is cut when a queue holds `max_batch_size` jobs, or when its
//!   oldest job has waited `max_wait` — and only when the model worker is
//!   free, so jobs keep accumulating while it computes.
//! - Jobs whose client went away (the handler future was dropped, so the
//!   reply channel is closed) are dropped before compute.
//! - The number of queued items is bounded; past it, handlers answer 503.
//!
//! Every decision is measured: queue depth, queue wait, batch sizes, compute
//! time and drops go to the Prometheus registry in [`Metrics`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::metrics::Metrics;
use crate::Encoder;

/// One input to embed. Images arrive already decoded and preprocessed (that
/// work runs on blocking threads, not on the model thread).
pub enum Item {
    Image(crate::preprocess::Pixels),
    Text(String),
}

impl Item {
    fn kind(&self) -> Kind {
        match self {
            Item::Image(_) => Kind::Image,
            Item::Text(_) => Kind::Text,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Image,
    Text,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Image => "image",
            Kind::Text => "text",
        }
    }
}

type Reply = oneshot::Sender<Result<Vec<f32>, String>>;

struct Job {
    item: Item,
    reply: Reply,
    at: Instant,
}

#[derive(Clone, Copy, Debug)]
pub struct BatchConfig {
    pub max_batch_size: usize,
    pub max_wait: Duration,
    /// Items queued at most (both modalities); more are refused.
    pub max_queue: usize,
}

/// The queue is full: the caller should answer 503.
#[derive(Debug)]
pub struct QueueFull {
    pub queued: usize,
}

/// A handle to the engine; cheap to clone.
#[derive(Clone)]
pub struct Batcher {
    jobs: mpsc::UnboundedSender<Job>,
    queued: Arc<AtomicUsize>,
    cfg: BatchConfig,
}

impl Batcher {
    /// Starts the queue task (on the current tokio runtime) and the model
    /// worker thread.
    pub fn start(encoder: Arc<Encoder>, cfg: BatchConfig, metrics: Arc<Metrics>) -> Self {
        let (jobs_tx, jobs_rx) = mpsc::unbounded_channel();
        let (next_tx, next_rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        tokio::spawn(queue_task(
            jobs_rx,
            next_rx,
            cfg,
            queued.clone(),
            metrics.clone(),
        ));
        std::thread::Builder::new()
            .name("clasp-model".into())
            .spawn(move || model_worker(encoder, next_tx, metrics))
            .expect("spawn model thread");
        Self {
            jobs: jobs_tx,
            queued,
            cfg,
        }
    }

    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Embeds `items`, each through its modality's queue. All of them are
    /// admitted or none (so a request is never half-queued).
    pub async fn embed(
        &self,
        items: Vec<Item>,
    ) -> Result<Result<Vec<Vec<f32>>, String>, QueueFull> {
        let n = items.len();
        let before = self.queued.fetch_add(n, Ordering::AcqRel);
        if before + n > self.cfg.max_queue {
            self.queued.fetch_sub(n, Ordering::AcqRel);
            return Err(QueueFull { queued: before });
        }
        let mut waits = Vec::with_capacity(n);
        for item in items {
            let (tx, rx) = oneshot::channel();
            let job = Job {
                item,
                reply: tx,
                at: Instant::now(),
            };
            if self.jobs.send(job).is_err() {
                return Ok(Err("the batching engine has stopped".into()));
            }
            waits.push(rx);
        }
        let mut out = Vec::with_capacity(n);
        for rx in waits {
            match rx.await {
                Ok(Ok(v)) => out.push(v),
                Ok(Err(e)) => return Ok(Err(e)),
                Err(_) => return Ok(Err("the model worker stopped".into())),
            }
        }
        Ok(Ok(out))
    }
}

struct Queues {
    image: VecDeque<Job>,
    text: VecDeque<Job>,
}

impl Queues {
    fn peek(&self, k: Kind) -> &VecDeque<Job> {
        match k {
            Kind::Image => &self.image,
            Kind::Text => &self.text,
        }
    }
    fn get(&mut self, k: Kind) -> &mut VecDeque<Job> {
        match k {
            Kind::Image => &mut self.image,
            Kind::Text => &mut self.text,
        }
    }
    fn oldest(&self) -> Option<(Kind, Instant)> {
        let i = self.image.front().map(|j| (Kind::Image, j.at));
        let t = self.text.front().map(|j| (Kind::Text, j.at));
        match (i, t) {
            (Some(a), Some(b)) => Some(if a.1 <= b.1 { a } else { b }),
            (a, b) => a.or(b),
        }
    }
}

async fn queue_task(
    mut jobs: mpsc::UnboundedReceiver<Job>,
    mut next: mpsc::UnboundedReceiver<oneshot::Sender<(Kind, Vec<Job>)>>,
    cfg: BatchConfig,
    queued: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
) {
    let mut q = Queues {
        image: VecDeque::new(),
        text: VecDeque::new(),
    };
    let mut waiting: Option<oneshot::Sender<(Kind, Vec<Job>)>> = None;
    let mut open = true;
    loop {
        // Drop jobs whose client has gone before they cost compute.
        for k in [Kind::Image, Kind::Text] {
            let before = q.get(k).len();
            q.get(k).retain(|j| !j.reply.is_closed());
            let dropped = before - q.get(k).len();
            if dropped > 0 {
                queued.fetch_sub(dropped, Ordering::AcqRel);
                metrics.dropped_disconnected.inc_by(dropped as u64);
            }
            metrics
                .queue_depth
                .with_label_values(&[k.label()])
                .set(q.get(k).len() as i64);
        }
        if waiting.is_some() {
            let now = Instant::now();
            let full = [Kind::Image, Kind::Text]
                .into_iter()
                .filter(|k| q.peek(*k).len() >= cfg.max_batch_size)
                .min_by_key(|k| q.peek(*k).front().map(|j| j.at));
            let due = q
                .oldest()
                .filter(|(_, at)| now.duration_since(*at) >= cfg.max_wait || !open);
            if let Some(kind) = full.or(due.map(|d| d.0)) {
                let qk = q.get(kind);
                let take = qk.len().min(cfg.max_batch_size);
                let batch: Vec<Job> = qk.drain(..take).collect();
                queued.fetch_sub(batch.len(), Ordering::AcqRel);
                for j in &batch {
                    metrics
                        .queue_wait
                        .with_label_values(&[kind.label()])
                        .observe(now.duration_since(j.at).as_secs_f64());
                }
                metrics
                    .batch_size
                    .with_label_values(&[kind.label()])
                    .observe(batch.len() as f64);
                let tx = waiting.take().unwrap();
                if let Err((_, batch)) = tx.send((kind, batch)) {
                    for j in batch {
                        let _ = j.reply.send(Err("the model worker stopped".into()));
                    }
                }
                continue;
            }
        }
        if !open && q.oldest().is_none() {
            break; // drained
        }
        let deadline = match (&waiting, q.oldest()) {
            (Some(_), Some((_, at))) => Some(at + cfg.max_wait),
            _ => None,
        };
        tokio::select! {
            j = jobs.recv(), if open => match j {
                Some(j) => {
                    let k = j.item.kind();
                    q.get(k).push_back(j);
                }
                None => open = false,
            },
            w = next.recv(), if waiting.is_none() => match w {
                Some(tx) => waiting = Some(tx),
                None => break, // the worker is gone
            },
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {}
        }
    }
}

fn model_worker(
    encoder: Arc<Encoder>,
    next: mpsc::UnboundedSender<oneshot::Sender<(Kind, Vec<Job>)>>,
    metrics: Arc<Metrics>,
) {
    loop {
        let (tx, rx) = oneshot::channel();
        if next.send(tx).is_err() {
            return;
        }
        let Ok((kind, batch)) = rx.blocking_recv() else {
            return;
        };
        let t = std::time::Instant::now();
        let (items, replies): (Vec<Item>, Vec<Reply>) =
            batch.into_iter().map(|j| (j.item, j.reply)).unzip();
        let result: crate::Result<Vec<Vec<f32>>> = match kind {
            Kind::Image => {
                let px: Vec<crate::preprocess::Pixels> = items
                    .into_iter()
                    .map(|i| match i {
                        Item::Image(p) => p,
                        Item::Text(_) => unreachable!("one modality per batch"),
                    })
                    .collect();
                encoder
                    .embed_pixel_items(&px)
                    .and_then(|e| Ok(e.to_vec2::<f32>()?))
            }
            Kind::Text => {
                let texts: Vec<String> = items
                    .into_iter()
                    .map(|i| match i {
                        Item::Text(s) => s,
                        Item::Image(_) => unreachable!("one modality per batch"),
                    })
                    .collect();
                encoder
                    .embed_texts(&texts)
                    .and_then(|e| Ok(e.to_vec2::<f32>()?))
            }
        };
        metrics
            .compute_seconds
            .with_label_values(&[kind.label()])
            .observe(t.elapsed().as_secs_f64());
        match result {
            Ok(vectors) => {
                for (r, v) in replies.into_iter().zip(vectors) {
                    let _ = r.send(Ok(v));
                }
            }
            Err(e) => {
                // Not counted here: each request of the batch gets an
                // "internal" answer, which the endpoint wrapper counts once.
                for r in replies {
                    let _ = r.send(Err(e.to_string()));
                }
            }
        }
    }
}
