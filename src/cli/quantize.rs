//! `clasp quantize`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Args;

use super::note;
use candle_core::Device;
use clasp::encoder::Precision;

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// The dual encoder to quantize: a local directory or a Hugging Face Hub id.
    #[arg(long, short)]
    pub model: String,
    /// The folder to write (config, tokenizer and preprocessor files are copied; written whole or
    /// not at all).
    #[arg(long, short)]
    pub output: PathBuf,
}

pub fn run(a: QuantizeArgs) -> Result<ExitCode> {
    let files = clasp::model::resolve(&a.model)?;
    if clasp::model::int8_checkpoint::is_quantized(&files.weights)? {
        bail!("{} is already an int8 checkpoint", a.model);
    }
    // Loaded in int8, so the weights are quantized once, as the save needs them.
    let encoder = clasp::Encoder::load_with(
        &a.model,
        &Device::Cpu,
        clasp::model::Towers::Both,
        Some(Precision::Int8),
    )?;
    let s = clasp::model::int8_checkpoint::save(encoder.files(), encoder.model(), &a.output)?;
    note!(
        "wrote {}: {} linears in int8, {} tensors kept in f32; weights {:.1} MB -> {:.1} MB",
        a.output.display(),
        s.quantized,
        s.kept,
        s.bytes_before as f64 / 1e6,
        s.bytes_after as f64 / 1e6
    );
    Ok(ExitCode::SUCCESS)
}
