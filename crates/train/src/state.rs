//! A run's directory: `checkpoint/` (the model, in the Hugging Face layout)
//! and `state/` (the optimiser, the data order and the config), each file
//! written to a temporary name and renamed, so an interruption never leaves
//! a half-written state.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::config::TrainConfig;
use super::order::Order;
use crate::{Error, Result};

pub fn state_dir(out: &Path) -> PathBuf {
    out.join("state")
}

pub fn checkpoint_dir(out: &Path) -> PathBuf {
    out.join("checkpoint")
}

/// The resumable position of a run.
#[derive(Serialize, Deserialize)]
pub struct State {
    pub step: usize,
    pub order: Order,
    pub config: TrainConfig,
}

/// A new run must not write into another run's directory: its metrics would
/// be appended to the old ones and its state would replace the old state.
pub fn check_fresh_output(out: &Path) -> Result<()> {
    if state_dir(out).join("trainer.json").is_file() {
        return Err(Error::Report(format!(
            "{} already holds a training run; continue it with `clasp train --resume {}`, or give another --output",
            out.display(),
            out.display()
        )));
    }
    Ok(())
}

/// The saved state of the run in `out` (its step, order and config),
/// without the optimiser tensors.
pub fn read_state(out: &Path) -> Result<State> {
    let path = state_dir(out).join("trainer.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let mut st: State = serde_json::from_str(&text)
        .map_err(|e| Error::Report(format!("{}: {e}", path.display())))?;
    // The run continues where it now is, wherever it was first written.
    st.config.output = Some(out.to_path_buf());
    Ok(st)
}

/// The optimiser tensors of the run in `out`, on `dev`.
pub fn read_optimizer(out: &Path, dev: &Device) -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(
        state_dir(out).join("optimizer.safetensors"),
        dev,
    )?)
}

/// What a run resumes from: its state, its device opened, and its
/// optimiser tensors there.
pub fn read_resume(out: &Path) -> Result<(State, Device, HashMap<String, Tensor>)> {
    let st = read_state(out)?;
    let dev = st.config.device.open()?;
    let opt = read_optimizer(out, &dev)?;
    Ok((st, dev, opt))
}

/// Writes the optimiser tensors and the state, each atomically.
pub fn write(out: &Path, tensors: &HashMap<String, Tensor>, state: &State) -> Result<()> {
    let sd = state_dir(out);
    std::fs::create_dir_all(&sd).map_err(|e| Error::io(&sd, e))?;
    let tmp = crate::atomic::temp_beside(&sd.join("optimizer.safetensors"));
    candle_core::safetensors::save(tensors, &tmp)?;
    std::fs::rename(&tmp, sd.join("optimizer.safetensors")).map_err(|e| Error::io(&sd, e))?;
    let json = sd.join("trainer.json");
    let tmp = crate::atomic::temp_beside(&json);
    std::fs::write(
        &tmp,
        serde_json::to_string_pretty(state).expect("state serialises"),
    )
    .map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &json).map_err(|e| Error::io(&json, e))
}

/// Sets each trained variable from `saved` (a checkpoint's tensors, read
/// from `ckpt`), found under `key(name)`; a missing one is named.
pub fn restore_vars<'a>(
    vars: &'a [(String, candle_core::Var)],
    saved: &HashMap<String, Tensor>,
    ckpt: &Path,
    key: impl Fn(&'a str) -> &'a str,
) -> Result<()> {
    for (name, v) in vars {
        let t = saved.get(key(name)).ok_or_else(|| {
            crate::Error::Report(format!("{}: no {name} to resume from", ckpt.display()))
        })?;
        v.set(t)?;
    }
    Ok(())
}
