//! `clasp generate` and `clasp tokenize`: front ends over `clasp::llm`.

use super::note;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use clasp::llm::{self, GenerateOptions, LanguageModel, Message, Precision, SamplingParams};

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrecisionArg {
    /// The GGUF's own quantized weights (fast, small).
    Quantized,
    /// Weights dequantized to f32 (exact against transformers).
    F32,
}

impl From<PrecisionArg> for Precision {
    fn from(p: PrecisionArg) -> Self {
        match p {
            PrecisionArg::Quantized => Precision::Quantized,
            PrecisionArg::F32 => Precision::F32,
        }
    }
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// A .gguf file, a folder holding one, or a LlamaForCausalLM folder.
    #[arg(short, long)]
    pub model: PathBuf,
    /// The prompt text.
    #[arg(short, long, conflicts_with = "prompt_file")]
    pub prompt: Option<String>,
    /// Read the prompt from a UTF-8 file.
    #[arg(long, value_name = "FILE")]
    pub prompt_file: Option<PathBuf>,
    /// Wrap the prompt as a user turn in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// A system message (with --chat).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Most new tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// 0 is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set reaching this probability.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Penalise tokens already in the text (1.0: none).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when this string appears (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Weights: quantized as stored, or dequantized to f32.
    #[arg(long, value_enum, default_value_t = PrecisionArg::Quantized)]
    pub precision: PrecisionArg,
    /// Print one JSON object: text, token ids, stop reason, tokens/s.
    #[arg(long)]
    pub json: bool,
}

pub fn generate_cmd(a: GenerateArgs) -> Result<ExitCode> {
    let prompt = match (&a.prompt, &a.prompt_file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => {
            let bytes = std::fs::read(f).with_context(|| format!("{}", f.display()))?;
            String::from_utf8(bytes).map_err(|e| {
                anyhow::anyhow!(
                    "{}: not UTF-8 text (invalid byte at offset {})",
                    f.display(),
                    e.utf8_error().valid_up_to()
                )
            })?
        }
        (None, None) => bail!("give a prompt with --prompt TEXT or --prompt-file FILE"),
    };
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        repetition_penalty: a.repetition_penalty,
        seed: a.seed,
    };
    sampling.validate().map_err(|e| anyhow::anyhow!(e))?;
    let lm = LanguageModel::load(&a.model, a.precision.into(), &candle_core::Device::Cpu)?;
    let ids = if a.chat {
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(Message::new("system", s));
        }
        msgs.push(Message::new("user", &prompt));
        lm.tokenizer.encode_chat(&msgs, true)?
    } else {
        lm.tokenizer.encode(&prompt, true)?
    };
    let opts = GenerateOptions {
        max_new_tokens: a.max_tokens,
        sampling,
        stop: a.stop.clone(),
        ..Default::default()
    };
    let stdout = std::io::stdout();
    let json = a.json;
    let mut on_text = |piece: &str| {
        if !json {
            let mut out = stdout.lock();
            // A closed pipe (e.g. `| head`) ends generation quietly.
            return out
                .write_all(piece.as_bytes())
                .and_then(|_| out.flush())
                .is_ok();
        }
        true
    };
    let g = llm::generate(&lm.model, &lm.tokenizer, &ids, &opts, &mut on_text)?;
    if json {
        let v = serde_json::json!({
            "text": g.text,
            "ids": g.ids,
            "stop_reason": g.stop_reason,
            "prompt_tokens": g.prompt_tokens,
            "generated_tokens": g.ids.len(),
            "prefill_tokens_per_sec": g.prefill_tokens_per_sec(),
            "decode_tokens_per_sec": g.decode_tokens_per_sec(),
        });
        println!("{v}");
    } else {
        println!();
        tracing::info!(
            "{} prompt tokens at {:.1} tok/s, {} new at {:.1} tok/s, stop: {:?}",
            g.prompt_tokens,
            g.prefill_tokens_per_sec(),
            g.ids.len(),
            g.decode_tokens_per_sec(),
            g.stop_reason
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args, Debug)]
pub struct TokenizeArgs {
    /// Any model clasp loads: CLIP, Chinese-CLIP, dual encoder, or a language model.
    #[arg(short, long)]
    pub model: String,
    /// Texts to tokenize; each gives one JSON array of ids.
    #[arg(required = true)]
    pub texts: Vec<String>,
    /// Language models: render each text as a user turn of the chat template first.
    #[arg(long)]
    pub chat: bool,
}

pub fn tokenize_cmd(a: TokenizeArgs) -> Result<ExitCode> {
    let path = std::path::Path::new(&a.model);
    let rows: Vec<Vec<u32>> = if llm::is_language_model(path) {
        let src = llm::resolve(path)?;
        let tok = match src {
            llm::LlmSource::Gguf(p) => {
                let g = llm::GgufFile::open(&p)?;
                llm::LlmTokenizer::from_gguf(&g)?
            }
            llm::LlmSource::HfDir(d) => llm::LlmTokenizer::from_hf_dir(&d)?,
        };
        a.texts
            .iter()
            .map(|t| {
                if a.chat {
                    tok.encode_chat(&[Message::new("user", t)], true)
                } else {
                    tok.encode(t, true)
                }
            })
            .collect::<clasp::Result<_>>()?
    } else {
        if a.chat {
            bail!(
                "--chat needs a language model; {} is a dual encoder",
                a.model
            );
        }
        // Only config.json and the tokenizer files are needed: a local
        // folder without weights is fine; anything else goes through the Hub.
        let dir = if path.join("config.json").is_file() {
            path.to_path_buf()
        } else {
            clasp::model::resolve(&a.model)?.dir
        };
        let cfg = clasp::model::ModelConfig::from_file(&dir.join("config.json"))?;
        let tok =
            clasp::preprocess::text::TextTokenizer::from_dir(&dir, cfg.text_context_length())?;
        let tok = if cfg.reads_full_context() {
            tok.full_context()
        } else {
            tok
        };
        let batch = tok.encode(&a.texts)?;
        batch
            .ids
            .iter()
            .zip(&batch.mask)
            .map(|(ids, m)| {
                ids.iter()
                    .zip(m)
                    .filter(|(_, &k)| k != 0)
                    .map(|(&i, _)| i)
                    .collect()
            })
            .collect()
    };
    for r in rows {
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvertTarget {
    /// A Hugging Face checkpoint (safetensors, config.json, tokenizer files).
    Hf,
}

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// A language model (.gguf file, folder holding one, or LlamaForCausalLM folder), or an
    /// open_clip checkpoint folder (open_clip_config.json), written as a CLIPModel.
    #[arg(short, long)]
    pub model: PathBuf,
    /// The format to write.
    #[arg(long, value_enum, default_value_t = ConvertTarget::Hf)]
    pub to: ConvertTarget,
    /// The folder to write (replaced atomically).
    #[arg(short, long)]
    pub output: PathBuf,
}

/// Writes a language model as a `LlamaForCausalLM` checkpoint, dequantized to f32.
pub fn convert_cmd(a: ConvertArgs) -> Result<ExitCode> {
    if a.model.join(clasp::model::open_clip::CONFIG_FILE).is_file() {
        let had_tokenizer = clasp::model::open_clip::write_hf(&a.model, &a.output)?;
        if !had_tokenizer {
            note!(
                "{} has no tokenizer files: wrote open_clip's own CLIP BPE (vocab.json, merges.txt)",
                a.model.display()
            );
        }
        note!("wrote {} (CLIPModel)", a.output.display());
        return Ok(ExitCode::SUCCESS);
    }
    if !llm::is_language_model(&a.model) {
        bail!(
            "{}: clasp convert handles language models (GGUF or LlamaForCausalLM) and open_clip \
             checkpoints (open_clip_config.json)",
            a.model.display()
        );
    }
    if let Some(parent) = a.output.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            bail!(
                "{}: the output's parent folder does not exist",
                parent.display()
            );
        }
    }
    let lm = LanguageModel::load(&a.model, Precision::F32, &candle_core::Device::Cpu)?;
    lm.save_hf(&a.output)?;
    note!("wrote {}", a.output.display());
    Ok(ExitCode::SUCCESS)
}
