//! `clasp assemble`, `clasp chat`, `clasp merge-lora` and `clasp ask`:
//! front ends over `clasp::vlm`.

use super::note;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use clasp::llm::{GenerateOptions, SamplingParams};
use clasp::vlm::model::{DESCRIBE_EN, DESCRIBE_ZH};
use clasp::vlm::{ConnectorKind, Vlm};

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectorArg {
    /// LLaVA-1.5's two-layer MLP with GELU, on every patch token.
    Mlp2xGelu,
    /// A Perceiver resampler: --queries learnable queries, --layers blocks.
    Resampler,
    /// BLIP-2's Q-Former: --queries learned queries, --layers BERT layers, --heads heads of 64.
    Qformer,
}

/// Build an untrained vision-language model from a CLIP-family checkpoint and
/// a language model, and save it as a LlavaForConditionalGeneration folder
/// (a Blip2ForConditionalGeneration folder when the tower is BLIP-2's ViT).
#[derive(Args, Debug)]
pub struct AssembleArgs {
    /// The frozen vision tower: a CLIP-family checkpoint folder, a pretrained
    /// ImageNet CNN file, or a BLIP-2 folder (Blip2ForImageTextRetrieval or
    /// `train --task qformer`'s output), whose tower and Q-Former are used
    /// (with --connector qformer).
    #[arg(long, required_unless_present = "native", conflicts_with = "native")]
    pub vision: Option<PathBuf>,
    /// A VQ image tokenizer folder (Emu3VQVAE): build a native model (Emu3's
    /// layout) instead of a bridge, whose vocabulary holds a token per code.
    #[arg(long, value_name = "VQ_DIR")]
    pub native: Option<PathBuf>,
    /// The language model: a .gguf file, a folder holding one, or a LlamaForCausalLM folder.
    #[arg(long)]
    pub llm: PathBuf,
    #[arg(long, value_enum, default_value_t = ConnectorArg::Mlp2xGelu)]
    pub connector: ConnectorArg,
    /// Resampler queries: image tokens per image.
    #[arg(long, default_value_t = 16)]
    pub queries: usize,
    /// Resampler cross-attention blocks.
    #[arg(long, default_value_t = 2)]
    pub layers: usize,
    /// Resampler attention heads (they divide the vision width).
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    /// The vision hidden state the features come from (−2: the penultimate layer, as LLaVA).
    #[arg(long, default_value_t = -2, allow_negative_numbers = true)]
    pub vision_feature_layer: i64,
    /// Seed of the connector's initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// LLaVA-NeXT's AnyRes: tile each image at the best of these resolutions (HxW, comma
    /// separated, multiples of the tower's size) plus a downscaled base image, and save a
    /// LlavaNextForConditionalGeneration folder.
    #[arg(long, value_name = "HxW,...")]
    pub anyres: Option<Pinpoints>,
    /// Read videos too, LLaVA-NeXT-Video's way (frames pooled 2x2, a `<video>` placeholder):
    /// saves a LlavaNextVideoForConditionalGeneration folder. Needs --anyres.
    #[arg(long, requires = "anyres")]
    pub video: bool,
    #[arg(long, short)]
    pub output: PathBuf,
}

/// AnyRes grid pinpoints: `336x672,672x336`, (height, width) pairs.
#[derive(Clone, Debug)]
pub struct Pinpoints(pub Vec<(u32, u32)>);

impl std::str::FromStr for Pinpoints {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        clasp::preprocess::anyres::parse_pinpoints(s).map(Pinpoints)
    }
}

impl AssembleArgs {
    pub fn kind(&self) -> ConnectorKind {
        match self.connector {
            ConnectorArg::Mlp2xGelu => ConnectorKind::Mlp2xGelu,
            ConnectorArg::Resampler => ConnectorKind::Resampler {
                queries: self.queries,
                layers: self.layers,
                heads: self.heads,
            },
            ConnectorArg::Qformer => ConnectorKind::qformer(self.queries, self.layers, self.heads),
        }
    }
}

pub fn assemble_cmd(a: AssembleArgs) -> Result<ExitCode> {
    let device = candle_core::Device::Cpu;
    if let Some(vq) = &a.native {
        let m = clasp::vlm::native::NativeModel::assemble(&a.llm, vq, a.seed, &device)?;
        m.save(&a.output)?;
        note!(
            "wrote {} (a native model: {} code tokens from id {}, vocabulary {})",
            a.output.display(),
            m.tokens.codebook,
            m.tokens.first_code,
            m.llm.config().vocab_size
        );
        return Ok(ExitCode::SUCCESS);
    }
    let vision = a
        .vision
        .as_deref()
        .expect("clap requires --vision without --native");
    let mut vlm = Vlm::assemble(
        vision,
        &a.llm,
        a.kind(),
        a.vision_feature_layer,
        a.seed,
        &device,
    )?;
    if let Some(p) = &a.anyres {
        vlm.set_anyres(p.0.clone(), None, a.seed)?;
    }
    if a.video {
        vlm.enable_video()?;
    }
    vlm.save(&a.output)?;
    note!(
        "wrote {} ({} image tokens per image, image token id {})",
        a.output.display(),
        vlm.image_tokens(),
        vlm.cfg.image_token_index
    );
    Ok(ExitCode::SUCCESS)
}

/// Sampling flags shared by caption and chat.
#[derive(Args, Debug)]
pub struct SampleArgs {
    /// Most new tokens.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// 0 is greedy decoding (reproducible).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SampleArgs {
    pub(super) fn options(&self) -> Result<GenerateOptions> {
        let sampling = SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
            ..Default::default()
        };
        sampling.validate().map_err(|e| anyhow::anyhow!(e))?;
        Ok(GenerateOptions {
            max_new_tokens: self.max_tokens,
            sampling,
            ..Default::default()
        })
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LangArg {
    En,
    Zh,
}

/// The user turn: `prompt` with `<image>` put first when it has none.
pub(super) fn user_turn(prompt: Option<&str>, lang: LangArg) -> String {
    match prompt {
        Some(p) if p.contains("<image>") => p.to_string(),
        Some(p) => Vlm::caption_turn(p),
        None => Vlm::caption_turn(match lang {
            LangArg::En => DESCRIBE_EN,
            LangArg::Zh => DESCRIBE_ZH,
        }),
    }
}

pub(super) fn load(model: &Path) -> Result<Vlm> {
    Ok(Vlm::load(model, &candle_core::Device::Cpu)?)
}

/// The user turn about a video: `prompt` (or the default instruction in
/// `lang`) with `<video>` put first when it has none.
pub(super) fn video_turn(prompt: Option<&str>, lang: LangArg) -> String {
    use clasp::vlm::video::{DESCRIBE_VIDEO_EN, DESCRIBE_VIDEO_ZH, VIDEO_TOKEN};
    let text = prompt.unwrap_or(match lang {
        LangArg::En => DESCRIBE_VIDEO_EN,
        LangArg::Zh => DESCRIBE_VIDEO_ZH,
    });
    if text.contains(VIDEO_TOKEN) {
        text.to_string()
    } else {
        format!("{VIDEO_TOKEN}\n{text}")
    }
}

/// Ask a vision-language model about one image.
#[derive(Args, Debug)]
pub struct ChatArgs {
    /// A VLM checkpoint folder (a bridge's Llava layout, or a native Emu3 one).
    #[arg(short, long)]
    pub model: PathBuf,
    #[arg(long, required_unless_present = "video", conflicts_with = "video")]
    pub image: Option<PathBuf>,
    /// A video instead (any container FFmpeg reads), for a LLaVA-NeXT-Video model.
    #[arg(long)]
    pub video: Option<PathBuf>,
    /// Frames sampled from --video (the centres of equal spans).
    #[arg(long, default_value_t = 8)]
    pub frames: usize,
    /// The question; `<image>` (or `<video>`) marks where it goes (put first when absent).
    #[arg(short, long)]
    pub prompt: String,
    #[command(flatten)]
    pub sample: SampleArgs,
}

pub fn chat_cmd(a: ChatArgs) -> Result<ExitCode> {
    let opts = a.sample.options()?;
    if let Some(v) = &a.video {
        let vlm = load(&a.model)?;
        let frames = vlm
            .video_frames(v, a.frames)
            .with_context(|| v.display().to_string())?;
        let user = video_turn(Some(&a.prompt), LangArg::En);
        println!("{}", vlm.generate_video(&frames, &user, &opts)?.text);
        return Ok(ExitCode::SUCCESS);
    }
    let image = a
        .image
        .as_deref()
        .expect("clap requires --image without --video");
    let user = user_turn(Some(&a.prompt), LangArg::En);
    let text = if clasp::vlm::native::is_native(&a.model) {
        let m = clasp::vlm::native::NativeModel::load(&a.model, &candle_core::Device::Cpu)?;
        m.caption(image, &user, &opts)?.text
    } else {
        let img = clasp::preprocess::load_image(image)?;
        load(&a.model)?.generate_image(&img, &user, &opts)?.text
    };
    println!("{text}");
    Ok(ExitCode::SUCCESS)
}

#[derive(Args, Debug)]
pub struct MergeLoraArgs {
    /// A VLM checkpoint with a LoRA adapter beside its weights (from `clasp train --stage 2`).
    #[arg(long, short)]
    pub model: PathBuf,
    /// Where the merged checkpoint goes (written atomically, without adapter files).
    #[arg(long, short)]
    pub output: PathBuf,
}

pub fn merge_lora_cmd(a: MergeLoraArgs) -> Result<ExitCode> {
    let mut vlm = load(&a.model)?;
    let Some(lora) = vlm.llm.lora() else {
        bail!(
            "{}: no LoRA adapter (adapter_config.json) beside the weights",
            a.model.display()
        );
    };
    vlm.llm.merge_lora()?;
    vlm.save(&a.output)?;
    note!(
        "merged the rank-{} adapter ({}) into {}",
        lora.cfg.rank,
        lora.cfg.targets.join(", "),
        a.output.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Answer a question from a photo collection: retrieve from a clasp store,
/// then let a vision-language model answer with the photos in its prompt.
#[derive(Args, Debug)]
pub struct AskArgs {
    /// The question.
    pub question: String,
    /// A photo the question is about (it also queries the store, image→image).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// The vision-language model that answers.
    #[arg(long)]
    pub vlm: PathBuf,
    /// Photos retrieved into the prompt.
    #[arg(short = 'k', long, default_value_t = 3)]
    pub k: usize,
    /// Also match the question against the photos' captions (BM25), fused by RRF.
    #[arg(long)]
    pub hybrid: bool,
    /// The store's embedding model [default: the store's most recently used model].
    #[arg(long, short)]
    pub model: Option<String>,
    #[command(flatten)]
    pub sample: SampleArgs,
    /// Print {"answer", "sources", "cited", "skipped"} as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub store: super::search::StoreArgs,
}

pub fn ask_cmd(a: AskArgs) -> Result<ExitCode> {
    use clasp::rag;
    if a.k == 0 {
        bail!("-k must be at least 1");
    }
    let mut catalog = super::search::open_store(&a.store, false)?;
    let spec = super::search::model_spec(&a.model, catalog.as_mut())?;
    let encoder = super::load_encoder(
        &spec,
        &super::device(a.store.compute.device)?,
        clasp::model::Towers::Both,
        a.store.compute.precision,
        &a.store.resolution,
    )?;
    let model_id = clasp::index::model_id(catalog.as_mut(), &encoder, &spec)?;
    let engine = catalog.engine(model_id, clasp::index::ANN_THRESHOLD)?;
    if engine.is_empty() {
        bail!(
            "the store {} has no photos for {spec}; run `clasp index DIR -m {spec}` first",
            catalog.describe()
        );
    }
    let q = rag::RagQuery {
        question: a.question.clone(),
        image: a.image.clone(),
        k: a.k,
        hybrid: a.hybrid,
    };
    let sources = rag::retrieve(&encoder, catalog.as_mut(), engine.as_ref(), &q)?;
    let missing = engine.unanswered();
    if !missing.is_empty() {
        eprintln!(
            "warning: partial retrieval: {} did not answer (--allow-partial)",
            missing.join(", ")
        );
    }
    // A bridge or a native model answers.
    let vlm: Box<dyn clasp::vlm::ChatModel> = if clasp::vlm::native::is_native(&a.vlm) {
        let m = clasp::vlm::native::NativeModel::load(&a.vlm, &candle_core::Device::Cpu)?;
        Box::new(m)
    } else {
        Box::new(load(&a.vlm)?)
    };
    let (turn, skipped) =
        rag::conversation(vlm.as_ref(), &a.question, a.image.as_deref(), &sources)?;
    for (s, e) in &skipped {
        eprintln!("warning: [{}] {} left out: {e}", s.n, s.path);
    }
    let prompt = vlm.conversation_prompt(&[turn])?;
    let mut opts = vlm.chat_options(a.sample.options()?);
    // The answer is text: no image placeholder in it.
    opts.suppress_tokens
        .extend(vlm.tokenizer().token_to_id("<image>"));
    let g = clasp::llm::generate_prompt(vlm.llm(), vlm.tokenizer(), &prompt, &opts, &mut |_| true)?;
    let used: Vec<&rag::Source> = sources
        .iter()
        .filter(|s| !skipped.iter().any(|(k, _)| k.n == s.n))
        .collect();
    let cited = rag::cited(&g.text, sources.len());
    if a.json {
        let v = serde_json::json!({
            "answer": g.text,
            "sources": used,
            "cited": cited,
            "skipped": skipped.iter().map(|(s, e)| serde_json::json!({"path": s.path, "error": e.to_string()})).collect::<Vec<_>>(),
            "prompt_tokens": g.prompt_tokens,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{}", g.text.trim());
        println!();
        println!("Sources (the photos in the prompt; * cited by the answer):");
        for s in used {
            let mark = if cited.contains(&s.n) { "*" } else { " " };
            println!("{mark}[{}] {:.4}\t{}", s.n, s.score, s.path);
        }
    }
    Ok(ExitCode::SUCCESS)
}
