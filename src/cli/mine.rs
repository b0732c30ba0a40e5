//! `clasp mine`: offline hard negatives for the triplet objective.

use super::note;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Args;

use super::DeviceArg;
use clasp::data::{self, DatasetSpec, Lang, Split};
use clasp::progress::Progress;
use clasp::train::mine::MinedNegatives;

#[derive(Args, Debug)]
pub struct MineArgs {
    /// The text encoder: any model clasp loads (a directory or Hub id), or a
    /// sentence-transformers BERT directory such as all-MiniLM-L6-v2.
    #[arg(short, long)]
    pub model: String,
    /// The captions, as `clasp eval` and `clasp train` read them (e.g. flickr8k:DIR).
    #[arg(long)]
    pub dataset: String,
    #[arg(long, default_value = "train")]
    pub split: String,
    /// en or zh.
    #[arg(long, default_value = "en")]
    pub lang: String,
    /// Nearest captions of other images considered per caption.
    #[arg(long, default_value_t = 10)]
    pub top_k: usize,
    /// Keep candidates whose cosine lies in LO,HI (above HI a paraphrase is likely).
    #[arg(long, default_value = "0.5,0.95", allow_hyphen_values = true)]
    pub window: String,
    /// Captions per encoder batch.
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// Where the model runs (cuda needs a build with the `cuda` feature).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// Where to write the negatives (JSON), for `clasp train --negatives`.
    #[arg(short, long)]
    pub output: PathBuf,
}

/// Unit-length embeddings of a batch of captions.
type TextEmbedder = dyn Fn(&[String]) -> clasp::Result<candle_core::Tensor>;

pub fn run(a: MineArgs) -> Result<ExitCode> {
    let bounds: Vec<f32> = a
        .window
        .split(',')
        .map(|v| v.trim().parse::<f32>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| anyhow::anyhow!("--window {}: expected LO,HI cosines", a.window))?;
    let [lo, hi] = bounds[..] else {
        bail!("--window {}: expected two cosines, LO,HI", a.window);
    };
    if lo.is_nan() || hi.is_nan() || lo > hi {
        bail!("--window {lo},{hi}: the low end must not exceed the high end");
    }
    let set = data::load_pairs(
        &DatasetSpec::parse(&a.dataset)?,
        Split::parse(&a.split)?,
        Lang::parse(&a.lang)?,
        None,
    )?;
    let device = super::device(a.device)?;
    // A sentence-transformers checkpoint (plain BERT, e.g. all-MiniLM-L6-v2)
    // is a text-only encoder; anything else loads as a dual encoder.
    let sentence = std::path::Path::new(&a.model);
    let embed: Box<TextEmbedder> = if clasp::model::sentence::is_bert_dir(sentence) {
        let enc = clasp::model::sentence::SentenceEncoder::load(sentence, &device)?;
        Box::new(move |t| enc.embed(t))
    } else {
        let enc = clasp::Encoder::load(&a.model, &device)?;
        Box::new(move |t| enc.embed_texts(t))
    };
    let bar = super::BarProgress::default();
    bar.start("embed", set.captions.len() as u64);
    let mut emb: Vec<Vec<f32>> = Vec::with_capacity(set.captions.len());
    for chunk in set.captions.chunks(a.batch_size.max(1)) {
        emb.extend(embed(chunk)?.to_vec2::<f32>()?);
        bar.inc(chunk.len() as u64);
    }
    bar.start("mine", set.captions.len() as u64);
    let anchors = MinedNegatives::mine(&set, &emb, a.top_k, (lo, hi), &bar);
    bar.finish();
    let with = anchors.iter().filter(|n| !n.is_empty()).count();
    let total: usize = anchors.iter().map(Vec::len).sum();
    let m = MinedNegatives {
        dataset: a.dataset.clone(),
        model: a.model.clone(),
        top_k: a.top_k,
        window: (lo, hi),
        captions: set.captions.clone(),
        anchors,
    };
    m.save(&a.output)?;
    note!(
        "{} captions: {with} with hard negatives, {total} in all; wrote {}",
        set.captions.len(),
        a.output.display()
    );
    Ok(ExitCode::SUCCESS)
}
