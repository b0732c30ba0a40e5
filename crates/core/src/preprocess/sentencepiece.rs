//! SentencePiece models (`spiece.model`) and SigLIP's tokenizer over them.
//!
//! Why not a SentencePiece crate: the maintained ones bind the C++ library
//! (a CMake build in the default tree). The `tokenizers` crate already has
//! both halves that matter, the unigram Viterbi and the precompiled
//! normalization charsmap, as transformers' own converters use them; what it
//! lacks is the reader of the model file (a protobuf, read here with `prost`
//! from the five message fields the tokenizer needs) and SentencePiece's
//! whitespace rules, which are a few lines (`normalizer.cc`).
//!
//! SigLIP's tokenizer has no fast (tokenizer.json) form in transformers: it is
//! the slow `SiglipTokenizer`, which canonicalizes text (lowercase, ASCII
//! punctuation removed, whitespace collapsed) before SentencePiece, and
//! encodes `"<unk>" + text`, dropping the tokens of `"<unk>"`, to control the
//! leading space. [`SiglipTokenizer`] follows it step by step, so the ids are
//! the same, edge cases included.

use std::path::Path;

use prost::Message;
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::Precompiled;
use tokenizers::{Model, NormalizedString, Normalizer};

use crate::{Error, Result};

/// SentencePiece's `ModelProto`, only the fields the encoder reads (prost
/// skips the rest).
#[derive(Clone, PartialEq, Message)]
struct ModelProto {
    #[prost(message, repeated, tag = "1")]
    pieces: Vec<PieceProto>,
    #[prost(message, optional, tag = "2")]
    trainer_spec: Option<TrainerSpec>,
    #[prost(message, optional, tag = "3")]
    normalizer_spec: Option<NormalizerSpec>,
}

#[derive(Clone, PartialEq, Message)]
struct PieceProto {
    #[prost(string, optional, tag = "1")]
    piece: Option<String>,
    #[prost(float, optional, tag = "2")]
    score: Option<f32>,
    /// NORMAL = 1, UNKNOWN = 2, CONTROL = 3, USER_DEFINED = 4, UNUSED = 5, BYTE = 6.
    #[prost(int32, optional, tag = "3")]
    kind: Option<i32>,
}

#[derive(Clone, PartialEq, Message)]
struct TrainerSpec {
    /// UNIGRAM = 1, BPE = 2, WORD = 3, CHAR = 4.
    #[prost(int32, optional, tag = "3")]
    model_type: Option<i32>,
    #[prost(bool, optional, tag = "35")]
    byte_fallback: Option<bool>,
}

#[derive(Clone, PartialEq, Message)]
struct NormalizerSpec {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(bytes = "vec", optional, tag = "2")]
    precompiled_charsmap: Option<Vec<u8>>,
    #[prost(bool, optional, tag = "3")]
    add_dummy_prefix: Option<bool>,
    #[prost(bool, optional, tag = "4")]
    remove_extra_whitespaces: Option<bool>,
    #[prost(bool, optional, tag = "5")]
    escape_whitespaces: Option<bool>,
}

const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const USER_DEFINED: i32 = 4;
const BYTE: i32 = 6;
const SPACE: char = '\u{2581}';

/// A SentencePiece unigram model, encoding as `SentencePieceProcessor.encode`.
pub struct SentencePiece {
    model: Unigram,
    charsmap: Option<Precompiled>,
    add_dummy_prefix: bool,
    remove_extra_whitespaces: bool,
    escape_whitespaces: bool,
    pieces: Vec<String>,
}

impl std::fmt::Debug for SentencePiece {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentencePiece")
            .field("pieces", &self.pieces.len())
            .finish()
    }
}

impl SentencePiece {
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(&bytes).map_err(|reason| Error::Tokenizer {
            path: path.to_path_buf(),
            reason,
        })
    }

    fn from_bytes(bytes: &[u8]) -> std::result::Result<Self, String> {
        let proto = ModelProto::decode(bytes)
            .map_err(|e| format!("not a SentencePiece model (protobuf: {e})"))?;
        if proto.pieces.is_empty() {
            return Err("the SentencePiece model has no pieces".into());
        }
        let trainer = proto.trainer_spec.unwrap_or_default();
        match trainer.model_type.unwrap_or(1) {
            1 => {}
            t => {
                return Err(format!(
                    "SentencePiece model type {t} is not supported; only unigram (1) is"
                ))
            }
        }
        let norm = proto.normalizer_spec.unwrap_or_default();
        let charsmap = match norm.precompiled_charsmap.as_deref() {
            Some(b) if !b.is_empty() => Some(
                Precompiled::from(b)
                    .map_err(|e| format!("bad precompiled normalization charsmap: {e}"))?,
            ),
            _ => None,
        };
        let unk_id = proto
            .pieces
            .iter()
            .position(|p| p.kind == Some(UNKNOWN))
            .ok_or("the SentencePiece model has no <unk> piece")?;
        let pieces: Vec<String> = proto
            .pieces
            .iter()
            .map(|p| p.piece.clone().unwrap_or_default())
            .collect();
        // Only normal, user-defined and byte pieces match text. Control and
        // unknown pieces (<pad>, </s>, <unk>) never do in SentencePiece, so
        // they get strings no normalized text holds (a NUL cannot survive
        // the charsmap, and none is produced by the rules below).
        let vocab = proto
            .pieces
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let kind = p.kind.unwrap_or(NORMAL);
                let text = if matches!(kind, NORMAL | USER_DEFINED | BYTE) {
                    pieces[i].clone()
                } else {
                    format!("\0{i}")
                };
                (text, f64::from(p.score.unwrap_or(0.0)))
            })
            .collect();
        let model = Unigram::from(vocab, Some(unk_id), trainer.byte_fallback.unwrap_or(false))
            .map_err(|e| e.to_string())?;
        Ok(Self {
            model,
            charsmap,
            add_dummy_prefix: norm.add_dummy_prefix.unwrap_or(true),
            remove_extra_whitespaces: norm.remove_extra_whitespaces.unwrap_or(true),
            escape_whitespaces: norm.escape_whitespaces.unwrap_or(true),
            pieces,
        })
    }

    pub fn piece_to_id(&self, piece: &str) -> Option<u32> {
        self.pieces
            .iter()
            .position(|p| p == piece)
            .map(|i| i as u32)
    }

    pub fn len(&self) -> usize {
        self.pieces.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// SentencePiece's normalizer (`normalizer.cc`): the charsmap, then
    /// leading spaces dropped and runs of spaces collapsed, a space put in
    /// front, spaces escaped to U+2581, and trailing (escaped) spaces
    /// dropped: a literal U+2581 at the end goes too, as there.
    pub fn normalize(&self, text: &str) -> Result<String> {
        let mapped = match &self.charsmap {
            Some(cm) => {
                let mut n = NormalizedString::from(text);
                cm.normalize(&mut n)
                    .map_err(|e| Error::Tokenize(e.to_string()))?;
                n.get().to_string()
            }
            None => text.to_string(),
        };
        let mut out = String::with_capacity(mapped.len() + 4);
        let mut prev_space = false;
        for c in mapped.chars() {
            if c == ' ' && self.remove_extra_whitespaces && (prev_space || out.is_empty()) {
                continue;
            }
            prev_space = c == ' ';
            out.push(c);
        }
        if self.add_dummy_prefix && !out.is_empty() {
            out.insert(0, ' ');
        }
        if self.escape_whitespaces {
            out = out.replace(' ', &SPACE.to_string());
        }
        if self.remove_extra_whitespaces {
            let space = if self.escape_whitespaces { SPACE } else { ' ' };
            out.truncate(out.trim_end_matches(space).len());
        }
        Ok(out)
    }

    /// The pieces of `text`, as `encode(text, out_type=str)`: normalized,
    /// split into words at each U+2581 (no piece spans one inside), and each
    /// word segmented by the unigram Viterbi.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let norm = self.normalize(text)?;
        let mut ids = Vec::new();
        let mut start = 0;
        let bounds = norm
            .char_indices()
            .filter(|&(i, c)| c == SPACE && i > 0)
            .map(|(i, _)| i)
            .chain([norm.len()]);
        for end in bounds {
            if end > start {
                let toks = self
                    .model
                    .tokenize(&norm[start..end])
                    .map_err(|e| Error::Tokenize(e.to_string()))?;
                ids.extend(toks.iter().map(|t| t.id));
            }
            start = end;
        }
        Ok(ids)
    }
}

/// transformers' `SiglipTokenizer`: canonicalized text through SentencePiece,
/// `</s>` at the end, padded with `</s>` to the context (64 for SigLIP, as it
/// was trained).
#[derive(Debug)]
pub struct SiglipTokenizer {
    spm: SentencePiece,
    eos: u32,
    pad: u32,
    /// Special tokens split out of the text before anything else, with the
    /// whitespace around them (transformers' `lstrip`/`rstrip`).
    specials: Vec<(String, u32)>,
    lowercase: bool,
    unk: String,
    unk_len: usize,
    /// The piece that is U+2581 alone, looked up once (not per text).
    lone_space: Option<u32>,
}

impl SiglipTokenizer {
    /// Loads `spiece.model` and the special tokens named in
    /// tokenizer_config.json (SiglipTokenizer's defaults when absent).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("spiece.model");
        let spm = SentencePiece::from_file(&path)?;
        let cfg: serde_json::Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default();
        let name = |key: &str, default: &str| -> String {
            match &cfg[key] {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Object(o) => o
                    .get("content")
                    .and_then(|v| v.as_str())
                    .unwrap_or(default)
                    .to_string(),
                _ => default.to_string(),
            }
        };
        let id = |tok: &str| {
            spm.piece_to_id(tok).ok_or_else(|| Error::Tokenizer {
                path: path.clone(),
                reason: format!("the special token {tok} is not a piece of the model"),
            })
        };
        let (eos_t, pad_t, unk_t) = (
            name("eos_token", "</s>"),
            name("pad_token", "</s>"),
            name("unk_token", "<unk>"),
        );
        let (eos, pad, unk) = (id(&eos_t)?, id(&pad_t)?, id(&unk_t)?);
        let mut specials = vec![(eos_t, eos), (unk_t.clone(), unk)];
        if pad != eos {
            specials.push((pad_t, pad));
        }
        // Longest first, so one special that contains another wins.
        specials.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        let unk_len = spm.encode(&unk_t)?.len();
        let lone_space = spm.piece_to_id(&SPACE.to_string());
        Ok(Self {
            spm,
            eos,
            pad,
            specials,
            lowercase: cfg["do_lower_case"].as_bool().unwrap_or(true),
            unk: unk_t,
            unk_len,
            lone_space,
        })
    }

    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    pub fn vocab_size(&self) -> usize {
        self.spm.len()
    }

    /// big_vision's text canonicalization, as `SiglipTokenizer` applies it:
    /// lowercase, ASCII punctuation removed, whitespace runs to one space,
    /// stripped.
    fn canonicalize(&self, text: &str) -> String {
        let lowered;
        let text = if self.lowercase {
            lowered = text.to_lowercase();
            &lowered
        } else {
            text
        };
        let kept: String = text.chars().filter(|c| !c.is_ascii_punctuation()).collect();
        kept.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    /// The text's ids without `</s>` (its `tokenize`, then the ids).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        // The slow tokenizer puts U+2581 in front (and turns any in the text
        // into spaces) before splitting out the special tokens.
        let text = format!("{SPACE}{}", text.replace(SPACE, " "));
        let mut out: Vec<(u32, bool)> = Vec::new();
        for (chunk, special) in self.split_specials(&text) {
            if let Some(id) = special {
                out.push((id, true));
                continue;
            }
            if chunk.is_empty() {
                continue;
            }
            let c = self.canonicalize(chunk);
            let ids = self.spm.encode(&format!("{}{c}", self.unk))?;
            out.extend(ids.into_iter().skip(self.unk_len).map(|i| (i, false)));
        }
        // A lone leading U+2581 before a special token is dropped.
        if out.len() > 1 && Some(out[0].0) == self.lone_space && !out[0].1 && out[1].1 {
            out.remove(0);
        }
        Ok(out.into_iter().map(|(i, _)| i).collect())
    }

    /// The text cut at special tokens: `(chunk, None)` for text and
    /// `(token, Some(id))` for a special token; whitespace next to a special
    /// token is dropped.
    fn split_specials<'a>(&self, text: &'a str) -> Vec<(&'a str, Option<u32>)> {
        let mut out = Vec::new();
        let mut rest = text;
        loop {
            let hit = self
                .specials
                .iter()
                .filter_map(|(s, id)| rest.find(s.as_str()).map(|p| (p, s.len(), *id)))
                .min_by_key(|&(p, len, _)| (p, std::cmp::Reverse(len)));
            let Some((p, len, id)) = hit else {
                out.push((rest, None));
                return out;
            };
            out.push((rest[..p].trim_end(), None));
            out.push((&rest[p..p + len], Some(id)));
            rest = rest[p + len..].trim_start();
        }
    }

    /// Ids for the model: truncated to `context - 1`, then `</s>` unless the
    /// text already ends with it (as `_add_eos_if_not_present`). Returns the
    /// ids and whether the text was truncated.
    pub fn encode(&self, text: &str, context: usize) -> Result<(Vec<u32>, bool)> {
        let mut ids = self.tokenize(text)?;
        let room = context.saturating_sub(1);
        let truncated = ids.len() > room;
        ids.truncate(room);
        if ids.last() != Some(&self.eos) {
            ids.push(self.eos);
        }
        Ok((ids, truncated))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> SentencePiece {
        let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
            .join("tests/fixtures/siglip/tiny-siglip");
        SentencePiece::from_file(&dir.join("spiece.model")).unwrap()
    }

    #[test]
    fn normalizer_follows_sentencepiece_whitespace_rules() {
        let s = tiny();
        // leading and repeated spaces go, one dummy prefix, spaces escaped
        assert_eq!(s.normalize("  a   b ").unwrap(), "\u{2581}a\u{2581}b");
        // a literal U+2581 at the end is dropped like a space
        assert_eq!(s.normalize("<unk>\u{2581}").unwrap(), "\u{2581}<unk>");
        // the nmt_nfkc charsmap: full-width letters and a ligature
        assert_eq!(s.normalize("ＡＢ ﬁ").unwrap(), "\u{2581}AB\u{2581}fi");
        assert_eq!(s.normalize("").unwrap(), "");
    }

    #[test]
    fn control_pieces_never_match_text() {
        let s = tiny();
        let ids = s.encode("</s>").unwrap();
        assert!(!ids.contains(&1), "{ids:?}");
        assert!(ids.len() > 1);
    }

    #[test]
    fn a_file_that_is_not_a_model_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("spiece.model");
        std::fs::write(&p, b"\xff\xff\xff not a protobuf").unwrap();
        let err = SentencePiece::from_file(&p).unwrap_err().to_string();
        assert!(err.contains("spiece.model"), "{err}");
    }
}
