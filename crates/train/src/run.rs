//! The one training loop. Every task (the dual encoder, the vision-language
//! stages, and the tasks still to come) implements [`Task`]: what a step
//! prepares, how it steps, what it saves and what runs after the last step.
//! [`run`] does the rest the same way for all of them: the batches drawn up
//! front from the saved order (so a save mid-run records the order at its
//! step, and a resumed run ends bit-identical), images prepared one batch
//! ahead on a worker with unreadable ones skipped and reported, Ctrl-C
//! saving, the save cadence, evaluation through the caller's hook, and
//! metrics.jsonl.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use super::config::TrainConfig;
use super::hooks::{record, Hooks, StepLog, TrainOutcome, TrainProgress};
use super::order::{self, Order};
use super::state::checkpoint_dir;
use crate::data::{self, ImageSource};
use crate::preprocess::pipeline;
use crate::{Error, Result};

/// Prepares one image of a batch: `(batch number in this run, position in
/// the batch, (image, caption))` to pixels.
pub type Prepare = Box<dyn Fn(usize, usize, &(usize, usize)) -> Result<Vec<f32>> + Send + Sync>;

/// What one kind of training contributes to [`run`].
pub trait Task {
    fn config(&self) -> &TrainConfig;
    /// The run's directory.
    fn out(&self) -> &Path;
    /// Steps taken so far (all invocations).
    fn steps_done(&self) -> usize;
    /// The data order as of the last step taken.
    fn order(&self) -> &Order;
    fn set_order(&mut self, order: Order);
    /// The training images, by the index batches use.
    fn images(&self) -> &[ImageSource];
    /// The next `n` batches of (image, caption) from `order`.
    fn draw(&self, order: &mut Order, n: usize) -> Vec<Vec<(usize, usize)>>;
    /// The image preparation for a run whose first step is `start`: owned,
    /// because it runs on the worker while the task steps.
    fn prepare(&self, start: usize) -> Prepare;
    /// The fewest readable images a step can learn from.
    fn min_batch(&self) -> usize;
    /// One optimiser step on the readable part of a batch.
    fn step(&mut self, batch: &[(usize, usize)], pixels: &[Vec<f32>]) -> Result<StepLog>;
    /// Saves the checkpoint and the state, recording `order`.
    fn save_at(&self, order: &Order) -> Result<()>;
    /// After the last step of a run that was not interrupted.
    fn finish(&mut self, _progress: &dyn TrainProgress) -> Result<()> {
        Ok(())
    }
    /// The ranks this run trains with (data parallelism; one process alone
    /// by default).
    fn group(&self) -> &dyn crate::dist::Collective {
        &crate::dist::Single
    }
    /// Whether this process writes checkpoints, state and metrics (under
    /// data parallelism only rank 0 does; every rank holds the same weights).
    fn writer(&self) -> bool {
        self.group().rank() == 0
    }
    /// Whether any rank was asked to stop (each rank's own `stop`, combined
    /// so that all stop after the same step).
    fn agree_stop(&self, stop: bool) -> Result<bool> {
        crate::dist::any(self.group(), stop)
    }
}

/// The [`Task`] methods every trainer answers from its own `cfg`, `out`,
/// `step` and `order` fields, written once: `crate::task_fields!();` inside
/// an `impl Task` (`crate::task_fields!(pairs);` adds `images` and `draw`).
#[macro_export]
#[doc(hidden)]
macro_rules! task_fields {
    () => {
        fn config(&self) -> &$crate::config::TrainConfig {
            &self.cfg
        }
        fn out(&self) -> &std::path::Path {
            &self.out
        }
        fn steps_done(&self) -> usize {
            self.step
        }
        fn order(&self) -> &$crate::order::Order {
            &self.order
        }
        fn set_order(&mut self, order: $crate::order::Order) {
            self.order = order;
        }
    };
    // Also `images` and `draw` for a trainer of (image, caption) pairs with
    // `set` (a `PairSet`) and `per_image` (its captions by image) fields.
    (pairs) => {
        $crate::task_fields!();
        fn images(&self) -> &[$crate::data::ImageSource] {
            &self.set.images
        }
        fn draw(&self, order: &mut $crate::order::Order, n: usize) -> Vec<Vec<(usize, usize)>> {
            (0..n)
                .map(|_| order.next_batch(&self.per_image, self.cfg.batch_size))
                .collect()
        }
    };
}

/// Runs `task` to the end of its schedule, or to `stop_after` total steps,
/// or until `stop` is set (Ctrl-C): the run then saves and returns.
pub fn run<T: Task>(
    task: &mut T,
    stop: &AtomicBool,
    stop_after: Option<usize>,
    hooks: &Hooks,
) -> Result<TrainOutcome> {
    let cfg = task.config().clone();
    let eval_set = match &cfg.eval_dataset {
        Some(spec) if hooks.evaluate.is_some() => {
            Some(data::load_pairs(spec, cfg.eval_split, cfg.lang, None)?)
        }
        Some(_) => {
            return Err(Error::Report(
                "the config names an eval_dataset but no evaluation hook was given".into(),
            ))
        }
        None => None,
    };
    let start = task.steps_done();
    let end = stop_after.unwrap_or(cfg.steps).min(cfg.steps);
    // The batches this invocation will run, drawn up front (indices only);
    // saves mid-run replay `base` to the step they record.
    let base = task.order().clone();
    let mut live = base.clone();
    let plan = task.draw(&mut live, end.saturating_sub(start));
    let order_at = |task: &T, step: usize| {
        let mut o = base.clone();
        task.draw(&mut o, step - start);
        o
    };
    let out = task.out().to_path_buf();
    let writer = task.writer();
    let mut metrics = if writer {
        Some(order::open_metrics(&out)?)
    } else {
        None
    };
    let progress = hooks.progress;
    progress.start("training", end.saturating_sub(start) as u64);
    let (mut last_loss, mut interrupted, mut last_dev) = (f64::NAN, false, None);
    let prepare = task.prepare(start);
    // When the last step ended: the time until the next batch is ready is
    // the loader's delay.
    let mut ready_since = std::time::Instant::now();
    pipeline::prepare_ahead(plan, prepare, |prepared| {
        let waited = ready_since.elapsed().as_secs_f64();
        if task.agree_stop(stop.load(Ordering::Relaxed))? {
            interrupted = true;
            return Ok(false);
        }
        let (batch, pixels, failed) = pipeline::partition(prepared);
        if batch.len() < task.min_batch() {
            return Err(Error::Report(format!(
                "step {}: too few readable images in the batch ({} of {}, at least {} needed); first error: {}",
                task.steps_done() + 1,
                batch.len(),
                batch.len() + failed.len(),
                task.min_batch(),
                failed
                    .first()
                    .map(|(_, e)| e.to_string())
                    .unwrap_or_default()
            )));
        }
        let mut log = task.step(&batch, &pixels)?;
        log.data_wait_s = Some(waited);
        let images = task.images();
        log.skipped = failed
            .iter()
            .map(|((i, _), e)| {
                tracing::warn!("skipped {}: {e}", images[*i].path().display());
                format!("{}: {e}", images[*i].path().display())
            })
            .collect();
        last_loss = log.loss;
        let step = task.steps_done();
        let save_now = (cfg.save_every > 0 && step.is_multiple_of(cfg.save_every)) || step == end;
        let eval_now = writer
            && eval_set.is_some()
            && ((cfg.eval_every > 0 && step.is_multiple_of(cfg.eval_every)) || step == cfg.steps);
        if writer && (save_now || eval_now) {
            task.save_at(&order_at(task, step))?;
        }
        if let (true, Some(set), Some(f)) = (eval_now, &eval_set, hooks.evaluate) {
            let m = f(&checkpoint_dir(&out), set)?;
            last_dev = Some(m.clone());
            log.dev = Some(m);
        }
        match &mut metrics {
            Some((file, path)) => record(file, path, &log, progress)?,
            None => {
                progress.step(&log);
                progress.inc(1);
            }
        }
        ready_since = std::time::Instant::now();
        Ok(true)
    })?;
    progress.finish();
    let now = order_at(task, task.steps_done());
    task.set_order(now);
    if interrupted && writer {
        task.save_at(task.order())?;
    }
    if writer && !interrupted && task.steps_done() == cfg.steps {
        task.finish(progress)?;
    }
    Ok(TrainOutcome {
        steps_done: task.steps_done(),
        interrupted,
        last_loss,
        dev: last_dev,
        checkpoint: checkpoint_dir(&out),
    })
}
