//! Generation: prefill the prompt into the KV cache, then decode one token at
//! a time until EOS, a stop string, the token limit or the context end.
//! Single prompts stream their text piece by piece; batches left-pad prompts
//! of different lengths and run them together.

use std::time::Instant;

use candle_core::Tensor;
use serde::Serialize;

use super::llama::Llama;
use super::sampling::{Sampler, SamplingParams};
use super::tokenizer::LlmTokenizer;
use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops when the text contains one of these; the text is cut
    /// before it.
    pub stop: Vec<String>,
    /// Token ids never generated (transformers' `suppress_tokens`), e.g. a
    /// vision-language model's image placeholder.
    pub suppress_tokens: Vec<u32>,
}

/// A prompt: its token ids and, when some positions are not tokens (image
/// features spliced in), its input embeddings `[t, hidden]`.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub ids: Vec<u32>,
    pub embeds: Option<Tensor>,
}

impl Prompt {
    pub fn tokens(ids: &[u32]) -> Self {
        Self {
            ids: ids.to_vec(),
            embeds: None,
        }
    }

    /// The input embeddings `[t, hidden]`.
    fn embeddings(&self, model: &Llama) -> Result<Tensor> {
        match &self.embeds {
            Some(e) => Ok(e.clone()),
            None => Ok(model
                .embed(&Tensor::new(self.ids.as_slice(), model.device())?.unsqueeze(0)?)?
                .squeeze(0)?),
        }
    }
}

/// Logits rows with the suppressed ids at −∞.
pub(super) fn suppress(row: &mut [f32], ids: &[u32]) {
    for &i in ids {
        if let Some(x) = row.get_mut(i as usize) {
            *x = f32::NEG_INFINITY;
        }
    }
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            suppress_tokens: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The end-of-sequence token.
    Eos,
    /// One of the stop strings.
    Stop,
    /// `max_new_tokens` reached.
    Length,
    /// The model's context is full.
    Context,
    /// The caller's callback asked to stop (a client went away).
    Cancelled,
}

#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub text: String,
    /// Generated ids, EOS included when it ended the sequence.
    pub ids: Vec<u32>,
    pub stop_reason: StopReason,
    pub prompt_tokens: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

impl Generation {
    pub fn prefill_tokens_per_sec(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_secs.max(1e-9)
    }
    /// Decode rate over the tokens after the first (which prefill produced).
    pub fn decode_tokens_per_sec(&self) -> f64 {
        (self.ids.len().saturating_sub(1)) as f64 / self.decode_secs.max(1e-9)
    }
}

/// Incremental detokenization: the text of the ids so far, and which part of
/// it is new. A trailing incomplete UTF-8 sequence (shown as U+FFFD) is held
/// back until the next token completes it.
pub(super) struct TextStream {
    emitted: usize,
}

impl TextStream {
    pub(super) fn new() -> Self {
        Self { emitted: 0 }
    }

    pub(super) fn next(&mut self, tok: &LlmTokenizer, ids: &[u32]) -> Result<(String, String)> {
        let text = tok.decode(ids, true)?;
        if text.ends_with('\u{FFFD}') || text.len() < self.emitted {
            return Ok((text, String::new()));
        }
        let piece = text[self.emitted..].to_string();
        self.emitted = text.len();
        Ok((text, piece))
    }
}

/// The prompt fits, with room for at least one new token.
pub(super) fn check_prompt(model: &Llama, prompt_len: usize) -> Result<()> {
    let ctx = model.config().max_position_embeddings;
    if prompt_len == 0 {
        return Err(Error::Generate("the prompt has no tokens".into()));
    }
    if prompt_len >= ctx {
        return Err(Error::Generate(format!(
            "the prompt is {prompt_len} tokens, and the model's context is {ctx}: shorten it"
        )));
    }
    Ok(())
}

pub(super) fn first_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
}

/// Generates a continuation of one prompt. `on_text` receives each new
/// piece of text as it is decoded; returning false stops generation.
pub fn generate(
    model: &Llama,
    tok: &LlmTokenizer,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<Generation> {
    generate_prompt(model, tok, &Prompt::tokens(prompt), opts, on_text)
}

/// [`generate`] for a prompt that may carry its own input embeddings.
pub fn generate_prompt(
    model: &Llama,
    tok: &LlmTokenizer,
    prompt: &Prompt,
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<Generation> {
    let (prompt, embeds) = (prompt.ids.as_slice(), prompt.embeds.as_ref());
    opts.sampling.validate().map_err(Error::Generate)?;
    check_prompt(model, prompt.len())?;
    let ctx = model.config().max_position_embeddings;
    let eos = tok.eos_id();
    let mut sampler = Sampler::new(opts.sampling.clone());
    let mut cache = model.new_cache(vec![0]);
    let mut history: Vec<u32> = prompt.to_vec();
    let mut ids: Vec<u32> = Vec::new();
    let mut stream = TextStream::new();
    let mut text = String::new();

    let t0 = Instant::now();
    let mut logits = match embeds {
        Some(e) => model.last_logits(&e.unsqueeze(0)?, &mut cache)?,
        None => {
            let input = Tensor::new(prompt, model.device())?.unsqueeze(0)?;
            model.forward_last(&input, &mut cache)?
        }
    };
    let prefill_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let stop_reason = loop {
        if ids.len() >= opts.max_new_tokens {
            break StopReason::Length;
        }
        let mut row: Vec<f32> = logits.squeeze(0)?.to_vec1()?;
        suppress(&mut row, &opts.suppress_tokens);
        let next = sampler.sample(&row, &history);
        ids.push(next);
        history.push(next);
        if Some(next) == eos {
            break StopReason::Eos;
        }
        let (full, piece) = stream.next(tok, &ids)?;
        if let Some(cut) = first_stop(&full, &opts.stop) {
            text = full[..cut].to_string();
            break StopReason::Stop;
        }
        text = full;
        if !piece.is_empty() && !on_text(&piece) {
            break StopReason::Cancelled;
        }
        if history.len() >= ctx {
            break StopReason::Context;
        }
        if ids.len() >= opts.max_new_tokens {
            break StopReason::Length;
        }
        let input = Tensor::new(&[next], model.device())?.unsqueeze(0)?;
        logits = model.forward_last(&input, &mut cache)?;
    };
    Ok(Generation {
        text,
        ids,
        stop_reason,
        prompt_tokens: prompt.len(),
        prefill_secs,
        decode_secs: t1.elapsed().as_secs_f64(),
    })
}

/// Generates continuations of several prompts together. Prompts are
/// left-padded to the longest; each row samples with its own generator
/// (seeded with `opts.sampling.seed`), so a row's output equals what
/// `generate` gives for it alone, up to float rounding of the padded GEMMs.
pub fn generate_batch(
    model: &Llama,
    tok: &LlmTokenizer,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
) -> Result<Vec<Generation>> {
    let p: Vec<Prompt> = prompts.iter().map(|p| Prompt::tokens(p)).collect();
    generate_batch_prompts(model, tok, &p, opts)
}

/// [`generate_batch`] for prompts that may carry their own input embeddings.
pub fn generate_batch_prompts(
    model: &Llama,
    tok: &LlmTokenizer,
    batch: &[Prompt],
    opts: &GenerateOptions,
) -> Result<Vec<Generation>> {
    opts.sampling.validate().map_err(Error::Generate)?;
    if batch.is_empty() {
        return Ok(Vec::new());
    }
    let prompts: Vec<Vec<u32>> = batch.iter().map(|p| p.ids.clone()).collect();
    let prompts = prompts.as_slice();
    for p in prompts {
        check_prompt(model, p.len())?;
    }
    let ctx = model.config().max_position_embeddings;
    let n = prompts.len();
    let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let pad_id = tok.eos_id().unwrap_or(0);
    let pad: Vec<usize> = prompts.iter().map(|p| longest - p.len()).collect();
    let mut flat = Vec::with_capacity(n * longest);
    for (p, &k) in prompts.iter().zip(&pad) {
        flat.extend(std::iter::repeat_n(pad_id, k));
        flat.extend_from_slice(p);
    }
    let eos = tok.eos_id();
    let mut samplers: Vec<Sampler> = (0..n)
        .map(|_| Sampler::new(opts.sampling.clone()))
        .collect();
    let mut history: Vec<Vec<u32>> = prompts.to_vec();
    let mut ids: Vec<Vec<u32>> = vec![Vec::new(); n];
    let mut texts: Vec<String> = vec![String::new(); n];
    let mut done: Vec<Option<StopReason>> = vec![None; n];
    let cache_pad = pad.clone();
    let mut cache = model.new_cache(pad);

    let t0 = Instant::now();
    let mut logits = if batch.iter().any(|p| p.embeds.is_some()) {
        // Left-pad each row's embeddings with the pad token's.
        let pad_row = model
            .embed(&Tensor::new(&[[pad_id]], model.device())?)?
            .squeeze(0)?;
        let rows = batch
            .iter()
            .zip(&cache_pad)
            .map(|(p, &k)| {
                let e = p.embeddings(model)?;
                if k == 0 {
                    return Ok(e);
                }
                let h = pad_row.dim(1)?;
                Ok(Tensor::cat(&[&pad_row.broadcast_as((k, h))?, &e], 0)?)
            })
            .collect::<Result<Vec<_>>>()?;
        model.last_logits(&Tensor::stack(&rows, 0)?, &mut cache)?
    } else {
        let input = Tensor::from_vec(flat, (n, longest), model.device())?;
        model.forward_last(&input, &mut cache)?
    };
    let prefill_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    loop {
        let mut rows: Vec<Vec<f32>> = logits.to_vec2()?;
        for r in rows.iter_mut() {
            suppress(r, &opts.suppress_tokens);
        }
        let mut next_ids = Vec::with_capacity(n);
        for r in 0..n {
            if done[r].is_some() {
                next_ids.push(pad_id);
                continue;
            }
            if ids[r].len() >= opts.max_new_tokens {
                done[r] = Some(StopReason::Length);
                next_ids.push(pad_id);
                continue;
            }
            let next = samplers[r].sample(&rows[r], &history[r]);
            ids[r].push(next);
            history[r].push(next);
            next_ids.push(next);
            if Some(next) == eos {
                done[r] = Some(StopReason::Eos);
                continue;
            }
            let full = tok.decode(&ids[r], true)?;
            if let Some(cut) = first_stop(&full, &opts.stop) {
                texts[r] = full[..cut].to_string();
                done[r] = Some(StopReason::Stop);
                continue;
            }
            texts[r] = full;
            if ids[r].len() >= opts.max_new_tokens {
                done[r] = Some(StopReason::Length);
            } else if longest + ids[r].len() >= ctx {
                done[r] = Some(StopReason::Context);
            }
        }
        if done.iter().all(|d| d.is_some()) {
            break;
        }
        let input = Tensor::from_vec(next_ids, (n, 1), model.device())?;
        logits = model.forward_last(&input, &mut cache)?;
    }
    let decode_secs = t1.elapsed().as_secs_f64();
    Ok((0..n)
        .map(|r| Generation {
            text: std::mem::take(&mut texts[r]),
            ids: std::mem::take(&mut ids[r]),
            stop_reason: done[r].unwrap_or(StopReason::Length),
            prompt_tokens: prompts[r].len(),
            prefill_secs,
            decode_secs,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_stop_takes_the_earliest() {
        let s = vec!["END".to_string(), "\n\n".to_string(), String::new()];
        assert_eq!(first_stop("ab\n\ncdEND", &s), Some(2));
        assert_eq!(first_stop("abc", &s), None);
    }
}
