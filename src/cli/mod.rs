//! Command-line front end: argument parsing, progress display and output
//! files. All model work goes through the library.

mod caption;
mod embed;
mod eval;
mod generate;
mod imagenet;
mod mine;
mod native;
mod output;
mod prefs;
mod quantize;
mod search;
mod serve;
mod store;
mod train;
mod vlm;

use std::process::ExitCode;

use anyhow::{Context, Result};
use candle_core::Device;
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "clasp",
    version,
    about = "Vision-language alignment: embed, evaluate, train, search and serve CLIP-family models"
)]
pub struct Cli {
    /// More log output (-v info, -vv debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Parses the command line; `clasp train --help` shows the library's
    /// training defaults.
    pub fn parse_args() -> Self {
        use clap::{CommandFactory, FromArgMatches};
        let cmd = Self::command().mut_subcommand("train", train::with_defaults);
        let m = cmd.get_matches();
        Self::from_arg_matches(&m).unwrap_or_else(|e| e.exit())
    }

    /// Whether this invocation trains (see `clasp::tune_for_training`).
    pub fn is_training(&self) -> bool {
        matches!(self.command, Command::Train(_))
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Embed images and/or texts into the model's shared space.
    Embed(embed::EmbedArgs),
    /// Evaluate alignment: retrieval Recall@K, zero-shot accuracy, diagnostics.
    #[command(subcommand)]
    Eval(eval::EvalCommand),
    /// Index image folders into a store (incremental, resumable).
    Index(search::IndexArgs),
    /// Search indexed images by text, image or query algebra.
    Search(search::SearchArgs),
    /// Zero-shot labels for every image in a folder.
    Classify(search::ClassifyArgs),
    /// Print a VQ image tokenizer's codes of images (JSON lines).
    TokenizeImage(native::TokenizeArgs),
    /// Draw images back from a VQ image tokenizer's codes (PNG).
    DetokenizeImage(native::DetokenizeArgs),
    /// Draw an image from a caption with a native (Emu3-layout) model.
    Draw(native::DrawArgs),
    /// Serve embeddings, similarity, classification and search over HTTP.
    Serve(serve::ServeArgs),
    /// Train or fine-tune a dual encoder contrastively (resumable).
    Train(Box<train::TrainArgs>),
    /// Mine hard negative captions for the triplet objective (`train --negatives`).
    Mine(mine::MineArgs),
    /// Build preference pairs against object hallucination (for `train --task dpo`).
    Prefs(prefs::PrefsArgs),
    /// Generate text with a language model (GGUF or LlamaForCausalLM).
    Generate(generate::GenerateArgs),
    /// Print the token ids of texts, one JSON array per text (any model).
    Tokenize(generate::TokenizeArgs),
    /// Convert a language model (to LlamaForCausalLM) or an open_clip checkpoint (to CLIPModel)
    /// to the Hugging Face layout.
    Convert(generate::ConvertArgs),
    /// Export a dual encoder for another runtime (ONNX).
    #[command(subcommand)]
    Export(ExportCommand),
    /// Build an untrained vision-language model (vision tower, connector, LLM).
    Assemble(vlm::AssembleArgs),
    /// Caption images with a vision-language model.
    Caption(caption::CaptionArgs),
    /// Ask a vision-language model about an image.
    Chat(vlm::ChatArgs),
    /// Rate answers about an image with a vision-language reward model.
    Score(caption::ScoreArgs),
    /// Fold a VLM's LoRA adapter into its language model's weights and save the result.
    MergeLora(vlm::MergeLoraArgs),
    /// Answer a question from an indexed photo collection with a vision-language model (RAG).
    Ask(vlm::AskArgs),
    /// Save a dual encoder with int8 weights (what `--precision int8` runs), so loading need not
    /// quantize.
    Quantize(quantize::QuantizeArgs),
    /// Copy a store into another (SQLite and PostgreSQL either way), or check one.
    #[command(subcommand)]
    Store(store::StoreCommand),
}

#[derive(clap::Subcommand, Debug)]
pub enum ExportCommand {
    /// Write vision.onnx and text.onnx (opset 17, dynamic batch and sequence axes, L2-normalised
    /// embeddings), preprocess.json and the tokenizer files.
    Onnx(ExportOnnxArgs),
}

#[derive(clap::Args, Debug)]
pub struct ExportOnnxArgs {
    /// Model: a local directory or a Hugging Face Hub id.
    #[arg(long, short)]
    pub model: String,
    /// The folder to write (replaced atomically).
    #[arg(long, short)]
    pub output: std::path::PathBuf,
    /// The graphs' arithmetic: f32, or int8 as `--precision int8` runs (the transformer blocks'
    /// linears in dynamic int8, with the same vectors as clasp's int8).
    #[arg(long, default_value = "f32", value_parser = ["f32", "int8"])]
    pub precision: String,
}

fn export_onnx(a: ExportOnnxArgs) -> Result<ExitCode> {
    let precision = match a.precision.as_str() {
        "int8" => clasp::export::OnnxPrecision::Int8,
        _ => clasp::export::OnnxPrecision::F32,
    };
    clasp::export::export_onnx(&a.model, &a.output, precision)?;
    note!(
        "wrote {} ({}): vision.onnx, text.onnx, preprocess.json",
        a.output.display(),
        a.precision
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

pub fn device(arg: DeviceArg) -> Result<Device> {
    Ok(match arg {
        DeviceArg::Cpu => clasp::device::DeviceKind::Cpu,
        DeviceArg::Cuda => clasp::device::DeviceKind::Cuda,
    }
    .open()?)
}

/// Where and in what arithmetic an encoder runs: the flags every command
/// that loads a dual encoder shares.
#[derive(clap::Args, Debug, Clone)]
pub struct ComputeArgs {
    /// Where the model runs (cuda needs a build with the `cuda` feature).
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
    /// The towers' arithmetic: f32; int8 (dynamic int8 on the CPU, several times faster on CPUs
    /// with AVX-512 VNNI); or bf16 (CPUs with avx512_bf16). Vectors of each precision are kept
    /// apart in stores and caches [default: f32, or int8 for a `clasp quantize` checkpoint].
    #[arg(long, value_name = "f32|int8|bf16")]
    pub precision: Option<clasp::encoder::Precision>,
}

/// The input resolution of the image tower.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ResolutionArgs {
    /// Run images at N x N pixels (a multiple of the patch size) instead of the model's trained
    /// size, with the position embeddings interpolated (transformers' interpolate_pos_encoding).
    /// Vectors of each size are kept apart in stores and caches.
    #[arg(long, value_name = "N")]
    pub image_size: Option<u32>,
    /// Keep each image's aspect ratio instead of cropping or squashing it: sides multiples of the
    /// patch size, at most (N / patch)^2 patches (SigLIP 2's NaFlex rule; N is --image-size or
    /// the trained size).
    #[arg(long)]
    pub keep_aspect: bool,
}

/// Loads an encoder (only `towers`) to run in `precision` if given, at the
/// resolution asked for.
pub fn load_encoder(
    spec: &str,
    dev: &Device,
    towers: clasp::model::Towers,
    precision: Option<clasp::encoder::Precision>,
    res: &ResolutionArgs,
) -> Result<clasp::Encoder> {
    let mut enc = clasp::Encoder::load_with(spec, dev, towers, precision)?;
    if res.image_size.is_some() || res.keep_aspect {
        enc.set_resolution(res.image_size, res.keep_aspect)?;
    }
    Ok(enc)
}

/// Loads the model an index is built with: a BLIP-2 retrieval folder (its
/// ITC: N query vectors per image), else a dual encoder as
/// [`load_encoder`] loads it.
pub fn load_embedder(
    spec: &str,
    dev: &Device,
    towers: clasp::model::Towers,
    precision: Option<clasp::encoder::Precision>,
    res: &ResolutionArgs,
) -> Result<Box<dyn clasp::index::Embedder>> {
    let dir = std::path::Path::new(spec);
    if !clasp::model::blip2::is_blip2_dir(dir) {
        return Ok(Box::new(load_encoder(spec, dev, towers, precision, res)?));
    }
    if precision.is_some_and(|p| p != clasp::encoder::Precision::F32)
        || res.image_size.is_some()
        || res.keep_aspect
    {
        anyhow::bail!(
            "{spec}: a BLIP-2 model runs in f32 at its own image size; --precision, --image-size \
             and --keep-aspect are for dual encoders"
        );
    }
    let m = clasp::model::blip2::Blip2Retrieval::load(dir, dev)
        .with_context(|| format!("--model {spec}"))?;
    Ok(Box::new(m))
}

static QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether `-q` asked for errors only: the summaries and notes that
/// commands print to stderr (through [`note!`]) are then left out.
pub fn quiet() -> bool {
    QUIET.load(std::sync::atomic::Ordering::Relaxed)
}

/// `eprintln!` for a summary or a note, not an error: silent under `-q`.
macro_rules! note {
    ($($arg:tt)*) => {
        if !$crate::cli::quiet() {
            eprintln!($($arg)*);
        }
    };
}
pub(crate) use note;

pub fn init_logging(verbose: u8, quiet: bool) {
    QUIET.store(quiet, std::sync::atomic::Ordering::Relaxed);
    let level = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CLASP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        // Colour codes only for a terminal, not in a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Embed(a) => embed::run(a),
        Command::Eval(c) => eval::run(c),
        Command::Index(a) => search::index_cmd(a),
        Command::Search(a) => search::search_cmd(a),
        Command::Classify(a) => search::classify_cmd(a),
        Command::TokenizeImage(a) => native::tokenize(a),
        Command::DetokenizeImage(a) => native::detokenize(a),
        Command::Draw(a) => native::draw(a),
        Command::Serve(a) => serve::run(a),
        Command::Train(a) => train::run(*a),
        Command::Mine(a) => mine::run(a),
        Command::Prefs(a) => prefs::run(a),
        Command::Generate(a) => generate::generate_cmd(a),
        Command::Tokenize(a) => generate::tokenize_cmd(a),
        Command::Convert(a) => generate::convert_cmd(a),
        Command::Export(ExportCommand::Onnx(a)) => export_onnx(a),
        Command::Assemble(a) => vlm::assemble_cmd(a),
        Command::Caption(a) => caption::caption_cmd(a),
        Command::Chat(a) => vlm::chat_cmd(a),
        Command::Score(a) => caption::score_cmd(a),
        Command::MergeLora(a) => vlm::merge_lora_cmd(a),
        Command::Ask(a) => vlm::ask_cmd(a),
        Command::Store(c) => store::run(c),
        Command::Quantize(a) => quantize::run(a),
    }
}

/// A progress bar on stderr; indicatif draws nothing when stderr is not a terminal.
pub fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(len);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>8} [{bar:30}] {pos}/{len} {per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// The library's progress reports drawn as one bar per phase.
#[derive(Default)]
pub struct BarProgress {
    bar: std::sync::Mutex<Option<indicatif::ProgressBar>>,
}

impl clasp::progress::Progress for BarProgress {
    fn start(&self, what: &str, len: u64) {
        let mut b = self.bar.lock().unwrap();
        if let Some(old) = b.take() {
            old.finish_and_clear();
        }
        *b = Some(progress_bar(len, what));
    }
    fn inc(&self, n: u64) {
        if let Some(b) = self.bar.lock().unwrap().as_ref() {
            b.inc(n);
        }
    }
    fn finish(&self) {
        if let Some(b) = self.bar.lock().unwrap().take() {
            b.finish_and_clear();
        }
    }
}

impl BarProgress {
    /// Text shown beside the bar.
    pub fn message(&self, msg: &str) {
        if let Some(b) = self.bar.lock().unwrap().as_ref() {
            b.set_message(msg.to_string());
        }
    }
}
