//! A vision-language reward model (`clasp train --task reward` on a VLM):
//! the VLM with its LoRA adapter, read at a conversation's last token by a
//! scalar head kept beside the checkpoint (`score.safetensors`, under PEFT's
//! `SEQ_CLS` name). It rates answers about an image: `clasp score`, and
//! best-of-n captioning.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::model::Vlm;
use crate::llm::Message;
use crate::{Error, Result};

/// The head's file beside a VLM reward model's checkpoint.
pub const SCORE_FILE: &str = "score.safetensors";
/// The head's name (PEFT's for a `SEQ_CLS` adapter's `modules_to_save`).
pub const SCORE_KEY: &str = "base_model.model.score.weight";

pub struct VlmReward {
    pub vlm: Vlm,
    head: Tensor,
}

impl VlmReward {
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let w = dir.join(SCORE_FILE);
        if !w.is_file() {
            return Err(Error::Report(format!(
                "{}: no {SCORE_FILE}; not a reward model (clasp train --task reward saves one)",
                dir.display()
            )));
        }
        let vlm = Vlm::load(dir, device)?;
        let t = candle_core::safetensors::load(&w, device).map_err(|e| Error::Weights {
            path: w.clone(),
            reason: e.to_string(),
        })?;
        let hidden = vlm.llm.config().hidden_size;
        let head = match t.get(SCORE_KEY) {
            Some(h) if h.dims() == [1, hidden] => h.to_dtype(DType::F32)?,
            other => {
                return Err(Error::Weights {
                    path: w,
                    reason: format!(
                        "{SCORE_KEY}: {:?}, expected [1, {hidden}]",
                        other.map(|h| h.dims().to_vec())
                    ),
                })
            }
        };
        Ok(Self { vlm, head })
    }

    /// The reward of each answer to the user turn `user` (one `<image>`)
    /// about one image (`pixels` `[1, 3, H, W]`).
    pub fn scores(&self, pixels: &Tensor, user: &str, answers: &[String]) -> Result<Vec<f32>> {
        let v = &self.vlm;
        let feats = v.image_features(pixels)?;
        let seqs = answers
            .iter()
            .map(|a| {
                let ids = v.tokenizer.encode_chat(
                    &[
                        Message::new("user", user),
                        Message::new("assistant", a.trim()),
                    ],
                    false,
                )?;
                v.input_embeds(&v.expand_images(&ids), &feats)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(v.llm
            .last_hidden(&seqs)?
            .matmul(&self.head.t()?)?
            .squeeze(1)?
            .to_vec1()?)
    }
}

/// One image's best-of-n caption: every sampled candidate with its reward,
/// and the index of the best.
#[derive(Debug, Clone)]
pub struct BestOf {
    pub candidates: Vec<(String, f32)>,
    pub best: usize,
}

/// Samples `n` answers to `user` per image with `policy` (`opts`' sampling,
/// the seed moved for each round) and keeps the one `rm` rates highest.
/// An image that cannot be read keeps its error.
#[allow(clippy::too_many_arguments)]
pub fn best_of(
    policy: &Vlm,
    rm: &VlmReward,
    images: &[crate::data::ImageSource],
    user: &str,
    opts: &crate::llm::GenerateOptions,
    n: usize,
    batch: usize,
    progress: &dyn crate::progress::Progress,
) -> Result<Vec<Result<BestOf>>> {
    let mut cands: Vec<Result<Vec<String>>> = (0..images.len()).map(|_| Ok(Vec::new())).collect();
    for k in 0..n {
        let mut o = opts.clone();
        o.sampling.seed = opts.sampling.seed.wrapping_add(k as u64);
        let got = super::caption::caption_images(policy, images, user, &o, batch, progress)?;
        for (c, g) in cands.iter_mut().zip(got) {
            match (c.as_mut(), g) {
                (Ok(list), Ok(g)) => list.push(g.text.trim().to_string()),
                (Ok(_), Err(e)) => *c = Err(e),
                (Err(_), _) => {}
            }
        }
    }
    cands
        .into_iter()
        .zip(images)
        .map(|(c, src)| {
            let list = match c {
                Ok(list) => list,
                Err(e) => return Ok(Err(e)),
            };
            let px = rm.vlm.pixels(&[src.path().as_path()])?;
            let r = rm.scores(&px, user, &list)?;
            let best = r
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(i, _)| i);
            Ok(Ok(BestOf {
                candidates: list.into_iter().zip(r).collect(),
                best,
            }))
        })
        .collect()
}
