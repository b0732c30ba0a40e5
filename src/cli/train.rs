//! `clasp train`.

use super::note;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};

use super::BarProgress;
use clasp::train::config::TrainConfig;
use clasp::train::dist::Collective;
use clasp::train::trainer::{self, StepLog, TrainProgress, Trainer};

#[path = "train_args.rs"]
mod train_args;
pub use train_args::TrainArgs;

/// The bar's message shows loss, learning rate, temperature and speed.
impl TrainProgress for BarProgress {
    fn step(&self, log: &StepLog) {
        let temp = if log.temperature.is_finite() {
            format!(" T {:.1}", log.temperature)
        } else {
            String::new()
        };
        self.message(&format!(
            "loss {:.4} lr {:.2e}{temp} {:.1} img/s",
            log.loss, log.lr, log.images_per_s
        ));
        if let Some(d) = &log.dev {
            note!("step {}: dev {}", log.step, d);
        }
    }
}

pub fn run(a: TrainArgs) -> Result<ExitCode> {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let flag = stop.clone();
        ctrlc::set_handler(move || {
            if flag.swap(true, Ordering::SeqCst) {
                std::process::exit(130); // a second Ctrl-C: leave now
            }
            eprintln!(
                "\nstopping after this step; saving checkpoint and state (Ctrl-C again to abort)"
            );
        })
        .context("installing the Ctrl-C handler")?;
        // Under mpirun, Ctrl-C makes the launcher kill the ranks; it
        // forwards SIGUSR1 instead (`kill -USR1 <mpirun's pid>`), which stops
        // every rank after the same step with rank 0 saving. SIGTERM (Slurm's
        // time limit, a job's cancellation) stops and saves as Ctrl-C does.
        #[cfg(unix)]
        signal_hook::flag::register(signal_hook::consts::SIGUSR1, stop.clone())
            .context("installing the SIGUSR1 handler")?;
    }
    let bar = BarProgress::default();
    // The config: a new run's from the flags and file, a resumed one's saved.
    let cfg = match &a.resume {
        Some(dir) => clasp::train::state::read_state(dir)?.config,
        None => build_config(&a)?,
    };
    if cfg.is_vlm() {
        return run_vlm(&a, cfg, &stop, &bar);
    }
    let task = cfg.task();
    if clasp::train::dist::launcher_world_size() > 1
        && !cfg.is_vlm()
        && task != clasp::train::config::Task::DualEncoder
    {
        anyhow::bail!(
            "data-parallel training (mpirun/srun) covers the dual encoder and the \
             vision-language model's language-model loss; train `{task:?}` in one process"
        );
    }
    if cfg.task() == clasp::train::config::Task::Qformer {
        return run_qformer(&a, cfg, &stop, &bar);
    }
    if cfg.task() == clasp::train::config::Task::Vq {
        use clasp::train::vq::VqTrainer;
        let mut run = match &a.resume {
            Some(dir) => VqTrainer::resume(dir)?,
            None => VqTrainer::new(cfg)?,
        };
        return drive(&mut run, None, a.stop_after, &stop, &bar);
    }
    if cfg.task() == clasp::train::config::Task::Native {
        use clasp::train::native_task::NativeTrainer;
        let mut run = match &a.resume {
            Some(dir) => NativeTrainer::resume(dir)?,
            None => NativeTrainer::new(cfg)?,
        };
        return drive(&mut run, None, a.stop_after, &stop, &bar);
    }
    if cfg.task().is_preference() {
        use clasp::train::preference_task::PreferenceTrainer;
        let mut run = match &a.resume {
            Some(dir) => PreferenceTrainer::resume(dir)?,
            None => PreferenceTrainer::new(cfg)?,
        };
        return drive(&mut run, None, a.stop_after, &stop, &bar);
    }
    // Under mpirun/srun: this rank's place in the group.
    let dist = clasp::train::dist::from_launcher()?;
    let run = match &a.resume {
        Some(dir) => Trainer::resume_in(dir, dist.clone()),
        None => {
            let mut cfg = cfg;
            // A preset's init is written before the run starts, and said;
            // by rank 0 alone, the others reading what it wrote.
            trainer::check_fresh_output(cfg.output_dir()?)?;
            dist.barrier();
            if dist.rank() == 0 {
                if let Some(note) = cfg.materialize_init()? {
                    note!("{note}");
                }
            }
            dist.barrier();
            if dist.rank() > 0 {
                cfg.adopt_init()?;
            }
            Trainer::new_in(cfg, dist.clone())
        }
    };
    let mut run = joined(run, &dist)?;
    let device = run.config().device.open()?;
    // Dev evaluation: clasp eval's retrieval metrics on the saved checkpoint.
    let evaluate = |ckpt: &std::path::Path, set: &clasp::data::PairSet| {
        clasp::eval::retrieval::checkpoint_metrics(ckpt, set, &device)
    };
    ranked(
        drive(&mut run, Some(&evaluate), a.stop_after, &stop, &bar),
        &dist,
    )
}

/// A trainer joined to its group, said once by rank 0; a rank that could
/// not build it stops the job.
fn joined<T: clasp::train::run::Task>(
    run: clasp::train::Result<T>,
    dist: &Arc<dyn Collective>,
) -> Result<T> {
    let run = ranked(run.map_err(anyhow::Error::from), dist)?;
    if dist.world() > 1 && dist.rank() == 0 {
        let b = run.config().batch_size;
        note!(
            "data parallel: {}, batch {b} per rank ({} per step)",
            dist.describe(),
            b * dist.world()
        );
    }
    Ok(run)
}

/// `r`, except that under data parallelism an error ends every rank.
fn ranked<T>(r: Result<T>, dist: &Arc<dyn Collective>) -> Result<T> {
    match r {
        Err(e) if dist.world() > 1 => rank_failed(dist.as_ref(), &e),
        r => r,
    }
}

/// A rank that cannot go on says why, naming itself, and ends the whole
/// job: the others would wait for it in the next collective forever. What
/// rank 0 saved before stays whole (its files are written by rename).
fn rank_failed(dist: &dyn Collective, e: &anyhow::Error) -> ! {
    eprintln!(
        "error: rank {} of {}: {e:#}; stopping every rank",
        dist.rank(),
        dist.world()
    );
    dist.abort(1)
}

/// Runs `task` through the one training loop, with the caller's dev
/// evaluation, then plots and says what it did (and prints the dev metrics).
fn drive<T: clasp::train::run::Task>(
    task: &mut T,
    evaluate: Option<trainer::EvalHook>,
    stop_after: Option<usize>,
    stop: &AtomicBool,
    bar: &BarProgress,
) -> Result<ExitCode> {
    let hooks = trainer::Hooks {
        progress: bar,
        evaluate,
    };
    let out = clasp::train::run::run(task, stop, stop_after, &hooks)?;
    if !task.writer() {
        return Ok(ExitCode::SUCCESS); // rank 0 plots and reports
    }
    finish(task.config().output_dir()?, &out);
    if let Some(d) = &out.dev {
        println!("{}", serde_json::to_string_pretty(d)?);
    }
    Ok(ExitCode::SUCCESS)
}

/// The end of a run: its curves plotted (a failure is said, not fatal) and
/// what it did.
fn finish(dir: &std::path::Path, out: &trainer::TrainOutcome) {
    if let Err(e) = clasp::eval::plot::training_curves(dir) {
        eprintln!(
            "warning: could not plot the training curves in {}: {e}",
            dir.display()
        );
    }
    note!(
        "{} after {} steps (last loss {:.4}); checkpoint: {}",
        if out.interrupted { "stopped" } else { "done" },
        out.steps_done,
        out.last_loss,
        out.checkpoint.display()
    );
}

/// `clasp train --llm ... --vision ...`: a vision-language run.
fn run_vlm(
    a: &TrainArgs,
    cfg: clasp::train::config::TrainConfig,
    stop: &AtomicBool,
    bar: &BarProgress,
) -> Result<ExitCode> {
    use clasp::train::vlm::VlmTrainer;
    let dist = clasp::train::dist::from_launcher()?;
    let run = match &a.resume {
        Some(dir) => VlmTrainer::resume(dir),
        None => VlmTrainer::new(cfg),
    };
    let mut run = joined(run.and_then(|r| r.with_collective(dist.clone())), &dist)?;
    // Dev evaluation: clasp eval caption's metrics on the saved checkpoint.
    let (device, lang, limit) = {
        let c = run.config();
        (c.device.open()?, c.lang, c.eval_limit)
    };
    let evaluate = |ckpt: &std::path::Path, set: &clasp::data::PairSet| {
        clasp::eval::captioning::checkpoint_caption_metrics(ckpt, set, lang, limit, &device)
    };
    ranked(
        drive(&mut run, Some(&evaluate), a.stop_after, stop, bar),
        &dist,
    )
}

/// `clasp train --task qformer`: BLIP-2's stage 1.
fn run_qformer(
    a: &TrainArgs,
    cfg: clasp::train::config::TrainConfig,
    stop: &AtomicBool,
    bar: &BarProgress,
) -> Result<ExitCode> {
    use clasp::train::qformer_task::QFormerTrainer;
    let mut run = match &a.resume {
        Some(dir) => QFormerTrainer::resume(dir)?,
        None => QFormerTrainer::new(cfg)?,
    };
    drive(&mut run, None, a.stop_after, stop, bar)
}

/// The config: the `--config` TOML table with the flags laid over it,
/// deserialised once by the library (which holds every default).
fn build_config(a: &TrainArgs) -> Result<TrainConfig> {
    let mut table = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| p.display().to_string())?;
            let t: toml::Table =
                toml::from_str(&text).with_context(|| format!("{}: invalid TOML", p.display()))?;
            match serde_json::to_value(t)? {
                serde_json::Value::Object(m) => m,
                _ => unreachable!("a TOML table is an object"),
            }
        }
        None => serde_json::Map::new(),
    };
    let flags = match serde_json::to_value(a)? {
        serde_json::Value::Object(m) => m,
        _ => unreachable!("flags serialise to an object"),
    };
    table.extend(flags);
    for kv in &a.set {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--set {kv}: expected KEY=VALUE"))?;
        // A TOML value (number, bool, array, quoted string), else the text.
        let v: serde_json::Value = match toml::from_str::<toml::Table>(&format!("v = {v}")) {
            Ok(t) => serde_json::to_value(&t["v"])?,
            Err(_) => serde_json::Value::String(v.to_string()),
        };
        table.insert(k.trim().replace('-', "_"), v);
    }
    let what = match &a.config {
        Some(p) => format!("{} and the flags", p.display()),
        None => "the flags".into(),
    };
    TrainConfig::from_table(table).with_context(|| format!("training config from {what}"))
}

/// Appends each key's default from `TrainConfig::default_values` to its
/// flag's help, so `--help` shows the library's defaults and no other copy.
pub fn with_defaults(cmd: clap::Command) -> clap::Command {
    let defaults = TrainConfig::default_values();
    cmd.mut_args(|arg| {
        let id = arg.get_id().as_str().to_string();
        match defaults.get(&id) {
            Some(v) if arg.get_action().takes_values() => {
                let shown = match v {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Array(a) if a.is_empty() => "none".into(),
                    other => other.to_string(),
                };
                let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
                arg.help(format!("{help} [default: {shown}]"))
            }
            _ => arg,
        }
    })
}
