//! `clasp prefs`: preference pairs against object hallucination, from a caption dataset.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Args;

use super::{note, BarProgress};
use clasp::data::{self, DatasetSpec, Lang, Split};
use clasp::train::prefs_build::{self, PrefMode};

#[derive(Args, Debug)]
pub struct PrefsArgs {
    /// Dataset: FORMAT:PATH or PATH, with English captions (the chosen answers).
    #[arg(long, short)]
    pub dataset: String,
    #[arg(long, default_value = "train")]
    pub split: String,
    /// How the rejected answer is made, comma-separated: swap (one object word of the
    /// reference replaced by an absent, co-occurring object), other (another photo's
    /// caption), sample (the model's own sampled caption that names an absent object).
    #[arg(long, default_value = "swap")]
    pub mode: String,
    /// The vision-language model whose captions `sample` draws.
    #[arg(long, short)]
    pub model: Option<PathBuf>,
    /// COCO instance annotations for the photos' objects [default: instances_*.json beside a
    /// COCO captions file]; the references' mentions count either way.
    #[arg(long)]
    pub instances: Option<PathBuf>,
    /// Pairs of each text mode per photo.
    #[arg(long, default_value_t = 1)]
    pub per_image: usize,
    /// `sample`: captions drawn per photo at most before it is given up.
    #[arg(long, default_value_t = 4)]
    pub tries: usize,
    /// `sample`: the sampling temperature and top-p.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Only the first N photos.
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The pairs: JSON lines in TRL's conversational format, the photo in `images`.
    #[arg(long, short)]
    pub output: PathBuf,
}

pub fn run(a: PrefsArgs) -> Result<ExitCode> {
    let modes = a
        .mode
        .split(',')
        .map(|m| PrefMode::parse(m.trim()))
        .collect::<clasp::Result<Vec<_>>>()?;
    if modes.contains(&PrefMode::Sample) && a.model.is_none() {
        bail!("--mode sample draws the captions of a vision-language model: give --model");
    }
    let spec = DatasetSpec::parse(&a.dataset)?;
    let mut set = data::load_pairs(&spec, Split::parse(&a.split)?, Lang::En, None)?;
    for i in &set.issues {
        eprintln!("warning: {i}");
    }
    if let Some(n) = a.limit {
        set.images.truncate(n);
        let keep: Vec<usize> = (0..set.captions.len())
            .filter(|&c| set.caption_image[c] < n)
            .collect();
        set.captions = keep.iter().map(|&c| set.captions[c].clone()).collect();
        set.caption_image = keep.iter().map(|&c| set.caption_image[c]).collect();
    }
    let instances = match a
        .instances
        .clone()
        .or_else(|| clasp::data::objects::instances_beside(&spec.path))
    {
        Some(p) => Some(clasp::data::objects::coco_instances(&p)?),
        None => None,
    };
    let objects = prefs_build::image_objects(&set, instances.as_ref());
    let text: Vec<PrefMode> = modes
        .iter()
        .copied()
        .filter(|m| *m != PrefMode::Sample)
        .collect();
    let mut pairs = prefs_build::text_pairs(&set, &objects, &text, a.per_image, a.seed);
    if modes.contains(&PrefMode::Sample) {
        let model = a.model.as_ref().expect("checked above");
        let vlm = clasp::vlm::Vlm::load(model, &candle_core::Device::Cpu)?;
        let mut opts = clasp::llm::GenerateOptions {
            max_new_tokens: 48,
            ..Default::default()
        };
        opts.sampling.temperature = a.temperature;
        opts.sampling.top_p = a.top_p;
        opts.sampling.seed = a.seed;
        pairs.extend(prefs_build::sampled_pairs(
            &vlm,
            &set,
            &objects,
            a.tries,
            &opts,
            8,
            &BarProgress::default(),
        )?);
    }
    if pairs.is_empty() {
        bail!(
            "no pair could be made from {} ({} photos): no reference mentions a COCO object",
            set.name,
            set.images.len()
        );
    }
    prefs_build::write_pairs(&a.output, &pairs, clasp::vlm::model::DESCRIBE_EN)?;
    let count = |m: PrefMode| pairs.iter().filter(|p| p.mode == m).count();
    note!(
        "wrote {} pairs to {} (swap {}, other {}, sample {}) from {} photos",
        pairs.len(),
        a.output.display(),
        count(PrefMode::Swap),
        count(PrefMode::Other),
        count(PrefMode::Sample),
        set.images.len()
    );
    Ok(ExitCode::SUCCESS)
}
