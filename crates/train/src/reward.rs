//! A reward model, as TRL's `RewardTrainer` trains one: the language model
//! (with a LoRA adapter) read at each sequence's last token by a scalar head
//! (`LlamaForSequenceClassification`'s `score`, no bias), trained with the
//! Bradley–Terry loss `−log σ(r(chosen) − r(rejected))` averaged over the
//! pairs. The sequences are whole conversations: prompt and answer.
//!
//! Saved as PEFT saves a `SEQ_CLS` adapter: the LoRA tensors and the head
//! as `base_model.model.score.weight` (PEFT's `modules_to_save`), so
//! `AutoModelForSequenceClassification` + `PeftModel.from_pretrained` load it.

use std::path::Path;

use candle_core::{DType, Tensor};
use serde::Serialize;

use crate::llm::Llama;
use crate::{Error, Result};

/// The head's name in a PEFT `SEQ_CLS` adapter file.
pub use clasp_vlm::reward::SCORE_KEY;

/// What TRL logs of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RewardStats {
    pub loss: f32,
    pub accuracy: f32,
    pub margin: f32,
    pub min_reward: f32,
    pub mean_reward: f32,
    pub max_reward: f32,
}

/// Each sequence's reward `[B]`: `seqs[i]` its input embeddings `[t_i,
/// hidden]`, `head` the score weight `[1, hidden]`. One right-padded batch
/// through the training forward; the reward is the head on the final normed
/// hidden state of the sequence's last token.
pub fn sequence_rewards(llm: &Llama, seqs: &[Tensor], head: &Tensor) -> Result<Tensor> {
    Ok(llm.last_hidden(seqs)?.matmul(&head.t()?)?.squeeze(1)?)
}

/// The Bradley–Terry loss of chosen and rejected rewards `[B]`, and the
/// batch's stats.
pub fn bradley_terry(chosen: &Tensor, rejected: &Tensor) -> Result<(Tensor, RewardStats)> {
    let d = (chosen - rejected)?;
    // −log σ(d) = log(1 + e^{−|d|}) − min(d, 0)
    let loss = ((d.abs()?.neg()?.exp()? + 1.0)?.log()? - d.minimum(0f32)?)?.mean_all()?;
    let c: Vec<f32> = chosen.detach().to_vec1()?;
    let r: Vec<f32> = rejected.detach().to_vec1()?;
    let all: Vec<f32> = c.iter().chain(&r).copied().collect();
    let n = c.len().max(1) as f32;
    let stats = RewardStats {
        loss: loss.to_scalar()?,
        accuracy: c.iter().zip(&r).filter(|(a, b)| a > b).count() as f32 / n,
        margin: c.iter().zip(&r).map(|(a, b)| a - b).sum::<f32>() / n,
        min_reward: all.iter().copied().fold(f32::INFINITY, f32::min),
        mean_reward: all.iter().sum::<f32>() / all.len().max(1) as f32,
        max_reward: all.iter().copied().fold(f32::NEG_INFINITY, f32::max),
    };
    Ok((loss, stats))
}

/// The score head `[1, hidden]` of a saved reward adapter (its folder).
pub fn load_head(dir: &Path, hidden: usize, dev: &candle_core::Device) -> Result<Tensor> {
    load_head_file(&dir.join("adapter_model.safetensors"), hidden, dev)
}

/// The score head `[1, hidden]` in the safetensors file `w`.
pub fn load_head_file(w: &Path, hidden: usize, dev: &candle_core::Device) -> Result<Tensor> {
    let w = w.to_path_buf();
    let t = candle_core::safetensors::load(&w, dev).map_err(|e| Error::Weights {
        path: w.clone(),
        reason: e.to_string(),
    })?;
    let head = t.get(SCORE_KEY).ok_or_else(|| Error::Weights {
        path: w.clone(),
        reason: format!("no {SCORE_KEY}: not a reward model's adapter"),
    })?;
    if head.dims() != [1, hidden] {
        return Err(Error::Weights {
            path: w,
            reason: format!("{SCORE_KEY} is {:?}, expected [1, {hidden}]", head.dims()),
        });
    }
    Ok(head.to_dtype(DType::F32)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn bradley_terry_by_formula() {
        let c = Tensor::new(&[1.0f32, 0.0], &Device::Cpu).unwrap();
        let r = Tensor::new(&[0.0f32, 2.0], &Device::Cpu).unwrap();
        let (_, s) = bradley_terry(&c, &r).unwrap();
        let nls = |x: f64| (1.0 + (-x).exp()).ln();
        assert!((s.loss as f64 - (nls(1.0) + nls(-2.0)) / 2.0).abs() < 1e-6);
        assert_eq!(
            (s.accuracy, s.margin, s.min_reward, s.max_reward),
            (0.5, -0.5, 0.0, 2.0)
        );
    }
}
