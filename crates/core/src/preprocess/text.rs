//! Tokenization with the `tokenizers` crate. tokenizer.json is used when
//! present; otherwise a CLIP BPE tokenizer is built from vocab.json +
//! merges.txt, or a BERT WordPiece tokenizer from vocab.txt, with the same
//! pipeline that transformers' converters write into tokenizer.json.

use std::path::Path;
use std::str::FromStr;

use candle_core::{Device, Tensor};
use serde_json::{json, Value};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use super::sentencepiece::SiglipTokenizer;
use crate::{Error, Result};

/// Token ids and attention masks, padded to the context length.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBatch {
    pub ids: Vec<Vec<u32>>,
    pub mask: Vec<Vec<u32>>,
    /// Whether the model may be given the batch cut to its longest real
    /// sequence. False for SigLIP, whose text tower attends over the whole
    /// padded context and pools its last position.
    pub trimmable: bool,
}

impl TokenBatch {
    /// The longest unpadded length in the batch (at least 1).
    pub fn longest(&self) -> usize {
        self.mask
            .iter()
            .map(|m| m.iter().filter(|&&v| v != 0).count())
            .max()
            .unwrap_or(1)
            .max(1)
    }

    /// `[B, T]` id and mask tensors. With `trim`, T is the longest real
    /// sequence instead of the full context: outputs are unchanged (CLIP's
    /// causal mask and BERT's padding mask both ignore trailing padding) and
    /// the text tower does far less work on short captions.
    pub fn to_tensors(&self, trim: bool, device: &Device) -> Result<(Tensor, Tensor)> {
        let b = self.ids.len();
        let full = self.ids.first().map_or(0, Vec::len);
        let t = if trim && self.trimmable {
            self.longest().min(full)
        } else {
            full
        };
        let flat = |rows: &[Vec<u32>]| -> Vec<u32> {
            rows.iter().flat_map(|r| r[..t].iter().copied()).collect()
        };
        Ok((
            Tensor::from_vec(flat(&self.ids), (b, t), device)?,
            Tensor::from_vec(flat(&self.mask), (b, t), device)?,
        ))
    }
}

#[derive(Clone)]
pub struct TextTokenizer {
    backend: Backend,
    context: usize,
    /// Whether batches may be cut to their longest real sequence (see
    /// [`TokenBatch::trimmable`]): not when padding goes on the left, nor
    /// for a model that reads the whole padded context ([`Self::full_context`]).
    trimmable: bool,
    /// open_clip's `basic_clean`: HTML entities decoded (twice, as it does)
    /// and the text stripped before tokenizing.
    html_clean: bool,
}

#[derive(Clone)]
enum Backend {
    /// A `tokenizers` pipeline with padding and truncation set.
    Hf(Box<Tokenizer>),
    /// SigLIP's slow SentencePiece tokenizer (see [`SiglipTokenizer`]).
    Siglip(std::sync::Arc<SiglipTokenizer>),
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("context", &self.context)
            .finish()
    }
}

impl TextTokenizer {
    /// Loads the tokenizer of a checkpoint directory and sets padding and
    /// truncation to `context` tokens.
    pub fn from_dir(dir: &Path, context: usize) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        if !tj.is_file() && dir.join("spiece.model").is_file() {
            return Ok(Self {
                backend: Backend::Siglip(std::sync::Arc::new(SiglipTokenizer::from_dir(dir)?)),
                context,
                trimmable: false,
                html_clean: false,
            });
        }
        let (tok, source) = if tj.is_file() {
            (Tokenizer::from_file(&tj).map_err(|e| tok_err(&tj, e))?, tj)
        } else if dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file() {
            let src = dir.join("vocab.json");
            (clip_bpe_from_files(dir)?, src)
        } else if dir.join("vocab.txt").is_file() {
            let src = dir.join("vocab.txt");
            (wordpiece_from_file(&src)?, src)
        } else if dir.join(crate::model::open_clip::CONFIG_FILE).is_file() {
            // open_clip keeps its BPE in its package; so does clasp.
            let src = dir.join(crate::model::open_clip::CONFIG_FILE);
            let tok = clip_bpe(
                super::clip_bpe::vocab_json(),
                &super::clip_bpe::merges_txt(),
                &src,
            )?;
            (tok, src)
        } else {
            return Err(Error::MissingTokenizer {
                dir: dir.to_path_buf(),
            });
        };
        let pad = pad_token(dir, &tok).ok_or_else(|| Error::Tokenizer {
            path: source.clone(),
            reason: "no padding token ([PAD] or <|endoftext|>) in the vocabulary".into(),
        })?;
        let left = pads_left(&read_config(dir));
        Self::new(tok, context, pad, left).map_err(|e| match e {
            Error::Tokenize(reason) => Error::Tokenizer {
                path: source,
                reason,
            },
            other => other,
        })
    }

    fn new(
        mut tok: Tokenizer,
        context: usize,
        (pad_token, pad_id): (String, u32),
        left: bool,
    ) -> Result<Self> {
        tok.with_truncation(Some(TruncationParams {
            max_length: context,
            ..Default::default()
        }))
        .map_err(|e| Error::Tokenize(e.to_string()))?;
        tok.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(context),
            pad_id,
            pad_token,
            direction: if left {
                tokenizers::PaddingDirection::Left
            } else {
                tokenizers::PaddingDirection::Right
            },
            ..Default::default()
        }));
        Ok(Self {
            backend: Backend::Hf(Box::new(tok)),
            context,
            trimmable: !left,
            html_clean: false,
        })
    }

    /// open_clip's tokenizer: texts are cleaned as its `basic_clean` does
    /// (HTML entities decoded twice, stripped) and padded with id 0.
    pub fn open_clip(mut self) -> Result<Self> {
        self.html_clean = true;
        self.with_pad_id(0)
    }

    /// Pads with `id` instead (open_clip pads with 0).
    pub fn with_pad_id(mut self, id: u32) -> Result<Self> {
        if let Backend::Hf(t) = &mut self.backend {
            let token = t.id_to_token(id).ok_or_else(|| {
                Error::Tokenize(format!("padding id {id} is not in the vocabulary"))
            })?;
            if let Some(p) = t.get_padding_mut() {
                p.pad_id = id;
                p.pad_token = token;
            }
        }
        Ok(self)
    }

    /// For a model whose text tower reads the whole padded context without a
    /// mask (SigLIP and SigLIP 2): batches are never cut short.
    pub fn full_context(mut self) -> Self {
        self.trimmable = false;
        self
    }

    pub fn context_length(&self) -> usize {
        self.context
    }

    /// The `tokenizers` pipeline, or None for a SentencePiece model read
    /// directly (SigLIP's `spiece.model`).
    pub fn inner(&self) -> Option<&Tokenizer> {
        match &self.backend {
            Backend::Hf(t) => Some(t),
            Backend::Siglip(_) => None,
        }
    }

    /// How many texts this process has truncated so far.
    pub fn truncated_count() -> usize {
        TRUNCATED.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Tokenizes texts, padded and truncated to the context length. Text that
    /// does not fit is truncated with a warning, never an error.
    pub fn encode<S: AsRef<str>>(&self, texts: &[S]) -> Result<TokenBatch> {
        let cleaned: Vec<String>;
        let inputs: Vec<&str> = if self.html_clean {
            cleaned = texts
                .iter()
                .map(|t| {
                    let once = html_escape::decode_html_entities(t.as_ref());
                    html_escape::decode_html_entities(&once).trim().to_string()
                })
                .collect();
            cleaned.iter().map(String::as_str).collect()
        } else {
            texts.iter().map(AsRef::as_ref).collect()
        };
        let tok = match &self.backend {
            Backend::Hf(t) => t,
            Backend::Siglip(s) => return self.encode_siglip(s, &inputs),
        };
        let encs = tok
            .encode_batch(inputs.clone(), true)
            .map_err(|e| Error::Tokenize(e.to_string()))?;
        let mut batch = TokenBatch {
            ids: Vec::with_capacity(encs.len()),
            mask: Vec::with_capacity(encs.len()),
            trimmable: self.trimmable,
        };
        for (enc, text) in encs.iter().zip(&inputs) {
            if !enc.get_overflowing().is_empty() {
                warn_truncated(text, self.context);
            }
            batch.ids.push(enc.get_ids().to_vec());
            batch.mask.push(enc.get_attention_mask().to_vec());
        }
        Ok(batch)
    }
}

impl TextTokenizer {
    /// SigLIP: each text's ids padded with the pad id to the full context,
    /// which the model reads whole (not trimmable).
    fn encode_siglip(&self, tok: &SiglipTokenizer, texts: &[&str]) -> Result<TokenBatch> {
        use rayon::prelude::*;
        let rows = texts
            .par_iter()
            .map(|t| tok.encode(t, self.context))
            .collect::<Result<Vec<_>>>()?;
        let mut batch = TokenBatch {
            ids: Vec::with_capacity(rows.len()),
            mask: Vec::with_capacity(rows.len()),
            trimmable: false,
        };
        for ((mut ids, truncated), text) in rows.into_iter().zip(texts) {
            if truncated {
                warn_truncated(text, self.context);
            }
            let mut mask = vec![1; ids.len()];
            ids.resize(self.context, tok.pad_id());
            mask.resize(self.context, 0);
            batch.ids.push(ids);
            batch.mask.push(mask);
        }
        Ok(batch)
    }
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Whether padding goes on the left: `padding_side` in tokenizer_config.json,
/// else the default of its `tokenizer_class` in transformers (the Llama and
/// Gemma families, SigLIP 2's, XLNet's and Cohere's pad on the left).
fn pads_left(cfg: &Value) -> bool {
    if let Some(side) = cfg["padding_side"].as_str() {
        return side == "left";
    }
    let class = cfg["tokenizer_class"].as_str().unwrap_or("");
    let class = class.strip_suffix("Fast").unwrap_or(class);
    matches!(
        class,
        "GemmaTokenizer"
            | "LlamaTokenizer"
            | "CodeLlamaTokenizer"
            | "CohereTokenizer"
            | "Siglip2Tokenizer"
            | "XLNetTokenizer"
    )
}

/// tokenizer_config.json, or null when absent or unreadable.
fn read_config(dir: &Path) -> Value {
    std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default()
}

/// The padding token: `pad_token` from tokenizer_config.json or
/// special_tokens_map.json when given, else [PAD] or <|endoftext|>.
fn pad_token(dir: &Path, tok: &Tokenizer) -> Option<(String, u32)> {
    let from_config = ["tokenizer_config.json", "special_tokens_map.json"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(dir.join(f)).ok())
        .filter_map(|s| serde_json::from_str::<Value>(&s).ok())
        .find_map(|v| match &v["pad_token"] {
            Value::String(s) => Some(s.clone()),
            Value::Object(o) => o.get("content").and_then(Value::as_str).map(String::from),
            _ => None,
        });
    from_config
        .into_iter()
        .chain(["[PAD]".to_string(), "<|endoftext|>".to_string()])
        .find_map(|t| tok.token_to_id(&t).map(|id| (t, id)))
}

/// CLIP's BPE tokenizer from vocab.json + merges.txt, in the form transformers'
/// `CLIPConverter` writes: NFC, whitespace folding and lowercasing, CLIP's
/// split pattern, byte-level BPE with `</w>` word ends, and
/// `<|startoftext|> ... <|endoftext|>` around each text.
fn clip_bpe_from_files(dir: &Path) -> Result<Tokenizer> {
    let vp = dir.join("vocab.json");
    let mp = dir.join("merges.txt");
    let vocab: Value =
        serde_json::from_str(&std::fs::read_to_string(&vp).map_err(|e| Error::io(&vp, e))?)
            .map_err(|e| tok_err(&vp, e))?;
    let merges_text = std::fs::read_to_string(&mp).map_err(|e| Error::io(&mp, e))?;
    clip_bpe(vocab, &merges_text, &vp)
}

/// CLIP's BPE tokenizer from its vocabulary and merges; `vp` names the
/// source in errors.
fn clip_bpe(vocab: Value, merges_text: &str, vp: &Path) -> Result<Tokenizer> {
    let merges: Vec<Value> = merges_text
        .lines()
        .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
        .map(|l| {
            let mut parts = l.split(' ');
            json!([parts.next().unwrap_or(""), parts.next().unwrap_or("")])
        })
        .collect();
    let id = |t: &str| vocab.get(t).and_then(Value::as_u64);
    let (bos, eos) = match (id("<|startoftext|>"), id("<|endoftext|>")) {
        (Some(b), Some(e)) => (b, e),
        _ => {
            return Err(tok_err(
                vp,
                "vocab.json lacks <|startoftext|> or <|endoftext|>",
            ))
        }
    };
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [
            {"id": bos, "content": "<|startoftext|>", "single_word": false, "lstrip": false,
             "rstrip": false, "normalized": true, "special": true},
            {"id": eos, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
             "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
            {"type": "Lowercase"}
        ]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex":
                "<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+"},
             "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]},
        "post_processor": {"type": "RobertaProcessing", "sep": ["<|endoftext|>", eos],
            "cls": ["<|startoftext|>", bos], "trim_offsets": false, "add_prefix_space": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<|endoftext|>",
            "continuing_subword_prefix": "", "end_of_word_suffix": "</w>", "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges}
    });
    Tokenizer::from_str(&spec.to_string()).map_err(|e| tok_err(vp, e))
}

/// BERT's WordPiece tokenizer from vocab.txt, as transformers' `BertConverter`
/// writes it (lowercasing, Chinese characters split, accents kept as the
/// lowercase default implies), with `[CLS] ... [SEP]`.
fn wordpiece_from_file(path: &Path) -> Result<Tokenizer> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let vocab: serde_json::Map<String, Value> = text
        .lines()
        .enumerate()
        .map(|(i, t)| (t.trim_end_matches('\r').to_string(), json!(i)))
        .collect();
    let id = |t: &str| vocab.get(t).and_then(Value::as_u64);
    let (Some(cls), Some(sep)) = (id("[CLS]"), id("[SEP]")) else {
        return Err(tok_err(path, "vocab.txt lacks [CLS] or [SEP]"));
    };
    let added: Vec<Value> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .iter()
        .filter_map(|t| {
            id(t).map(|i| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": true})
            })
        })
        .collect();
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
            "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
            "special_tokens": {
                "[CLS]": {"id": "[CLS]", "ids": [cls], "tokens": ["[CLS]"]},
                "[SEP]": {"id": "[SEP]", "ids": [sep], "tokens": ["[SEP]"]}}},
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
            "max_input_chars_per_word": 100, "vocab": vocab}
    });
    Tokenizer::from_str(&spec.to_string()).map_err(|e| tok_err(path, e))
}

static TRUNCATED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
/// Truncations shown one by one; after that one note, then only debug logs,
/// so a dataset of long captions does not flood the terminal.
const SHOWN_TRUNCATIONS: usize = 5;

fn warn_truncated(text: &str, context: usize) {
    let n = TRUNCATED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let shown: String = text.chars().take(40).collect();
    let more = if text.chars().count() > 40 { "..." } else { "" };
    if n < SHOWN_TRUNCATIONS {
        tracing::warn!("text truncated to {context} tokens: \"{shown}{more}\"");
    } else if n == SHOWN_TRUNCATIONS {
        tracing::warn!("more texts truncated to {context} tokens; further warnings suppressed (-vv shows them)");
    } else {
        tracing::debug!("text truncated to {context} tokens: \"{shown}{more}\"");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trimmed_tensors_cut_to_longest_real_sequence() {
        let b = TokenBatch {
            ids: vec![vec![5, 6, 7, 0, 0], vec![5, 6, 0, 0, 0]],
            mask: vec![vec![1, 1, 1, 0, 0], vec![1, 1, 0, 0, 0]],
            trimmable: true,
        };
        let (ids, mask) = b.to_tensors(true, &Device::Cpu).unwrap();
        assert_eq!(ids.dims(), &[2, 3]);
        assert_eq!(
            mask.to_vec2::<u32>().unwrap(),
            vec![vec![1, 1, 1], vec![1, 1, 0]]
        );
        let (ids, _) = b.to_tensors(false, &Device::Cpu).unwrap();
        assert_eq!(ids.dims(), &[2, 5]);
    }
}
