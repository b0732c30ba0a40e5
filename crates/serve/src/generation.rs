//! The generation engine behind `/v1/chat/completions`: continuous batching
//! as llama.cpp's server does it. One thread owns the chat model (a bridge or a native model)
//! and the running batch ([`Running`]); handlers send it jobs and read the
//! job's events.
//!
//! - When nothing runs, the engine waits for a job, then up to `max_wait`
//!   for more, up to `max_batch_size` (the seed's dynamic batching), and
//!   prefills them.
//! - While a batch runs, jobs that arrived join it between decode steps, up
//!   to `max_batch_size` rows; finished rows leave at once.
//! - A job whose client went away (its event receiver is dropped) is
//!   dropped before its prefill, or cancelled at the next step: its slot is
//!   freed.
//! - Jobs queued or running are bounded by `max_queue`; past it, handlers
//!   answer 503.
//!
//! Queue wait, rows per decode step, prefill and decode time, and drops are
//! measured in [`Metrics`] (kind `chat`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::metrics::Metrics;
use crate::llm::continuous::{Event, Running};
use crate::llm::{GenerateOptions, Generation};
use crate::vlm::{ChatModel, Turn};
use crate::Error;

/// What a job's handler hears.
#[derive(Debug)]
pub enum ChatEvent {
    /// The prompt was accepted and prefilled.
    Started {
        prompt_tokens: usize,
    },
    Text(String),
    Done(Generation),
    /// The prompt was refused (`bad` true: the request's fault) or the
    /// model failed.
    Failed {
        message: String,
        bad: bool,
    },
}

pub struct ChatJob {
    pub turns: Vec<Turn>,
    pub opts: GenerateOptions,
    pub events: mpsc::UnboundedSender<ChatEvent>,
    pub at: Instant,
}

#[derive(Clone, Copy, Debug)]
pub struct GenConfig {
    pub max_batch_size: usize,
    pub max_wait: Duration,
    /// Jobs queued or running at most.
    pub max_queue: usize,
    /// Prompt tokens prefilled per decode step (0: each prompt at once).
    pub prefill_chunk: usize,
}

/// A handle to the engine; cheap to clone.
#[derive(Clone)]
pub struct GenEngine {
    jobs: std_mpsc::Sender<ChatJob>,
    in_flight: Arc<AtomicUsize>,
    cfg: GenConfig,
}

/// The engine holds `max_queue` jobs already.
#[derive(Debug)]
pub struct Busy {
    pub in_flight: usize,
}

impl GenEngine {
    pub fn start(vlm: Arc<dyn ChatModel>, cfg: GenConfig, metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = std_mpsc::channel();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let count = in_flight.clone();
        std::thread::Builder::new()
            .name("clasp-generate".into())
            .spawn(move || engine(vlm.as_ref(), rx, cfg, &metrics, &count))
            .expect("spawn the generation thread");
        Self {
            jobs: tx,
            in_flight,
            cfg,
        }
    }

    /// Jobs queued or running.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Queues a job, or refuses it when the engine is full.
    pub fn submit(&self, job: ChatJob) -> Result<(), Busy> {
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        if before >= self.cfg.max_queue {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(Busy { in_flight: before });
        }
        if let Err(e) = self.jobs.send(job) {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            let _ = e.0.events.send(ChatEvent::Failed {
                message: "the generation engine has stopped".into(),
                bad: false,
            });
        }
        Ok(())
    }
}

/// The request's fault (a prompt that does not fit, a placeholder count
/// that does not match) or the model's.
fn is_bad_request(e: &Error) -> bool {
    !matches!(e, Error::Candle(_) | Error::Io { .. })
}

fn engine(
    vlm: &dyn ChatModel,
    rx: std_mpsc::Receiver<ChatJob>,
    cfg: GenConfig,
    metrics: &Metrics,
    in_flight: &AtomicUsize,
) {
    let new_run = || {
        let mut r = Running::new(vlm.llm(), vlm.tokenizer());
        r.set_prefill_chunk(Some(cfg.prefill_chunk));
        r
    };
    let mut run = new_run();
    let mut live: HashMap<u64, mpsc::UnboundedSender<ChatEvent>> = HashMap::new();
    let mut next_key = 0u64;
    let done = |n: usize| {
        in_flight.fetch_sub(n, Ordering::AcqRel);
    };
    loop {
        let mut fresh = Vec::new();
        if run.is_empty() {
            match rx.recv() {
                Ok(j) => fresh.push(j),
                Err(_) => return,
            }
            let deadline = Instant::now() + cfg.max_wait;
            while fresh.len() < cfg.max_batch_size {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(j) => fresh.push(j),
                    Err(_) => break,
                }
            }
        } else {
            while run.len() + fresh.len() < cfg.max_batch_size {
                match rx.try_recv() {
                    Ok(j) => fresh.push(j),
                    Err(_) => break,
                }
            }
        }
        for job in fresh {
            metrics
                .queue_wait
                .with_label_values(&["chat"])
                .observe(job.at.elapsed().as_secs_f64());
            if job.events.is_closed() {
                metrics.dropped_disconnected.inc();
                done(1);
                continue;
            }
            let key = next_key;
            next_key += 1;
            let t = Instant::now();
            let admitted = vlm.conversation_prompt(&job.turns).and_then(|p| {
                run.admit(key, &p, vlm.chat_options(job.opts))?;
                Ok(p.ids.len())
            });
            metrics
                .compute_seconds
                .with_label_values(&["chat_prefill"])
                .observe(t.elapsed().as_secs_f64());
            match admitted {
                Ok(prompt_tokens) => {
                    let _ = job.events.send(ChatEvent::Started { prompt_tokens });
                    live.insert(key, job.events);
                }
                Err(e) => {
                    let _ = job.events.send(ChatEvent::Failed {
                        bad: is_bad_request(&e),
                        message: e.to_string(),
                    });
                    done(1);
                }
            }
        }
        // Clients that went away since the last step.
        for (&k, tx) in &live {
            if tx.is_closed() {
                run.cancel(k);
            }
        }
        if run.is_empty() {
            continue;
        }
        metrics
            .batch_size
            .with_label_values(&["chat"])
            .observe(run.len() as f64);
        let t = Instant::now();
        let stepped = run.step(&mut |k, ev| match ev {
            Event::Text(s) => live
                .get(&k)
                .is_some_and(|tx| tx.send(ChatEvent::Text(s)).is_ok()),
            Event::Done(g) => {
                if let Some(tx) = live.remove(&k) {
                    if g.stop_reason == crate::llm::StopReason::Cancelled {
                        metrics.dropped_disconnected.inc();
                    }
                    let _ = tx.send(ChatEvent::Done(g));
                }
                done(1);
                true
            }
        });
        metrics
            .compute_seconds
            .with_label_values(&["chat_decode"])
            .observe(t.elapsed().as_secs_f64());
        if let Err(e) = stepped {
            // The batch's state is unknown: every live job fails, and the
            // engine starts over.
            tracing::error!("decode step failed: {e}");
            for (_, tx) in live.drain() {
                let _ = tx.send(ChatEvent::Failed {
                    message: format!("generation failed: {e}"),
                    bad: false,
                });
                done(1);
            }
            run = new_run();
        }
        metrics
            .queue_depth
            .with_label_values(&["chat"])
            .set(in_flight.load(Ordering::Relaxed).saturating_sub(run.len()) as i64);
    }
}
