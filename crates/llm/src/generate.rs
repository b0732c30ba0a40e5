//! Generation's options, results and entry points. There is one decode loop,
//! [`Running::step`](super::continuous::Running::step) (llama.cpp's slot
//! loop): a single prompt, a batch of captions and the server's requests are
//! all rows admitted into it, so they share its stop-string hold-back,
//! incremental detokenization and early exit of finished rows.

use candle_core::Tensor;
use serde::Serialize;

use super::continuous::{Event, Running};
use super::llama::Llama;
use super::sampling::SamplingParams;
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
    pub(super) fn embeddings(&self, model: &Llama) -> Result<Tensor> {
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

/// Incremental detokenization (text-generation-inference's): each new
/// token is decoded with the few tokens before it as context, and the text
/// it adds is the difference, so a step decodes a handful of ids, not the
/// whole answer. A trailing incomplete UTF-8 sequence (shown as U+FFFD) is
/// held back until a later token completes it.
pub(super) struct TextStream {
    /// The complete characters decoded so far.
    text: String,
    /// `ids[prefix..read]` made the end of `text`: the context the next
    /// token is decoded in (a Metaspace decoder strips a window's leading
    /// space, so the context's decode is subtracted, not assumed empty).
    prefix: usize,
    read: usize,
}

impl TextStream {
    pub(super) fn new() -> Self {
        Self {
            text: String::new(),
            prefix: 0,
            read: 0,
        }
    }

    /// The text so far.
    pub(super) fn text(&self) -> &str {
        &self.text
    }

    /// Takes in `ids` (all ids so far, the new one last) and returns the text
    /// it adds (empty while a character is incomplete).
    pub(super) fn next(&mut self, tok: &LlmTokenizer, ids: &[u32]) -> Result<String> {
        let before = tok.decode(&ids[self.prefix..self.read], true)?;
        let after = tok.decode(&ids[self.prefix..], true)?;
        if after.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let piece = match after.get(before.len()..) {
            Some(p) if after.starts_with(&before) => p.to_string(),
            // The context decodes differently once extended (rare): fall
            // back to the whole answer's text.
            _ => {
                let all = tok.decode(ids, true)?;
                all.get(self.text.len()..).unwrap_or_default().to_string()
            }
        };
        self.text.push_str(&piece);
        self.prefix = self.read;
        self.read = ids.len();
        Ok(piece)
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

/// [`generate`] for a prompt that may carry its own input embeddings: one
/// row of the engine.
pub fn generate_prompt(
    model: &Llama,
    tok: &LlmTokenizer,
    prompt: &Prompt,
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<Generation> {
    let mut g = run_rows(
        model,
        tok,
        std::slice::from_ref(prompt),
        opts,
        &mut |_, t| on_text(t),
    )?;
    Ok(g.pop().expect("one prompt, one generation"))
}

/// Generates continuations of several prompts together: each is a row of
/// the engine with its own generator (seeded with `opts.sampling.seed`), so
/// a row's output equals what [`generate`] gives for it alone, up to float
/// rounding of the batched decode GEMMs, and a finished row leaves at once.
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
    run_rows(model, tok, batch, opts, &mut |_, _| true)
}

/// Admits every prompt into one continuous batch (one prefill for all,
/// after every prompt is checked, so a bad one refuses the batch without
/// work) and steps it until all rows end; `on_text(row, piece)` streams each
/// row's text (false cancels that row).
fn run_rows(
    model: &Llama,
    tok: &LlmTokenizer,
    batch: &[Prompt],
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(usize, &str) -> bool,
) -> Result<Vec<Generation>> {
    let mut running = Running::new(model, tok);
    let rows: Vec<(u64, &Prompt)> = batch
        .iter()
        .enumerate()
        .map(|(i, p)| (i as u64, p))
        .collect();
    running.admit_many(&rows, opts)?;
    let mut done: Vec<Option<Generation>> = vec![None; batch.len()];
    while !running.is_empty() {
        running.step(&mut |key, event| match event {
            Event::Text(t) => on_text(key as usize, &t),
            Event::Done(g) => {
                done[key as usize] = Some(g);
                true
            }
        })?;
    }
    Ok(done
        .into_iter()
        .map(|g| g.expect("every admitted row ends"))
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
