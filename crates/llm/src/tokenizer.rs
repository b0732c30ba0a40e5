//! The language model's tokenizer, built from a GGUF file's `tokenizer.ggml.*`
//! metadata (or read from a Hugging Face `tokenizer.json`), and its chat
//! template rendered with minijinja.
//!
//! The GGUF path builds the same pipeline that transformers builds from the
//! same file (its `gguf_tokenizer_mapping`), so ids agree token for token:
//! byte-level BPE over the file's vocabulary and merges, tokens outside the
//! byte alphabet respelled into it, the pre-tokenizer split that the file's
//! `tokenizer.ggml.pre` names, control tokens (type 3) as special tokens and
//! user-defined tokens (type 4) as added tokens matched whole.

use std::path::Path;

use serde::Serialize;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::tokenizer::SplitDelimiterBehavior;
use tokenizers::{AddedToken, Tokenizer};

use super::gguf::GgufFile;
use crate::{Error, Result};

/// One chat message, as chat templates read it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct LlmTokenizer {
    inner: Tokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    chat_template: Option<String>,
}

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The split regex for a `tokenizer.ggml.pre` name, where it differs from
/// GPT-2's built-in one (the names and regexes transformers uses).
fn split_for(pre: &str) -> Option<&'static str> {
    match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "smaug-bpe" | "dbrx" | "pixtral"
        | "lfm2" => Some(LLAMA3_SPLIT),
        "qwen2" | "deepseek-r1-qwen" | "megrez" => Some(QWEN2_SPLIT),
        _ => None,
    }
}

/// GPT-2's reversible map from bytes to printable characters.
pub fn bytes_to_unicode() -> [char; 256] {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut map = ['\0'; 256];
    let mut extra = 0;
    for b in 0..256u32 {
        map[b as usize] = if printable.contains(&b) {
            char::from_u32(b).unwrap_or('\0')
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap_or('\0')
        };
    }
    map
}

impl LlmTokenizer {
    /// Builds the tokenizer from GGUF metadata.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let kind = g.get_string("tokenizer.ggml.model")?;
        if kind != "gpt2" {
            return Err(g.error(format!(
                "tokenizer.ggml.model is `{kind}`; clasp builds byte-level BPE (`gpt2`) tokenizers"
            )));
        }
        let tokens = g.get_strings("tokenizer.ggml.tokens")?;
        let merges = g.get_strings("tokenizer.ggml.merges")?;
        let types = if g.has_key("tokenizer.ggml.token_type") {
            g.get_ints("tokenizer.ggml.token_type")?
        } else {
            vec![1; tokens.len()]
        };
        let spelling = bytes_to_unicode();
        let alphabet: std::collections::HashSet<char> = spelling.iter().copied().collect();
        let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
        let spelled: Vec<String> = tokens
            .iter()
            .map(|t| {
                if in_alphabet(t) {
                    t.clone()
                } else {
                    t.bytes().map(|b| spelling[b as usize]).collect()
                }
            })
            .collect();
        let vocab: Vocab = spelled
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges: Vec<(String, String)> = merges
            .iter()
            .enumerate()
            .map(|(i, m)| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| {
                        g.error(format!(
                            "tokenizer.ggml.merges[{i}] = {m:?} is not two tokens split by a space"
                        ))
                    })
            })
            .collect::<Result<_>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| g.error(format!("cannot build the BPE model: {e}")))?;
        let mut inner = Tokenizer::new(bpe);
        let pre = if g.has_key("tokenizer.ggml.pre") {
            g.get_string("tokenizer.ggml.pre")?
        } else {
            "default".into()
        };
        match split_for(&pre) {
            Some(regex) => {
                let split = Split::new(
                    SplitPattern::Regex(regex.into()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(|e| g.error(format!("pre-tokenizer `{pre}`: {e}")))?;
                inner.with_pre_tokenizer(Some(Sequence::new(vec![
                    split.into(),
                    ByteLevel::new(false, true, false).into(),
                ])));
            }
            None => {
                inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
            }
        }
        inner.with_decoder(Some(ByteLevelDecoder::new(true, true, true)));
        let control: Vec<AddedToken> = spelled
            .iter()
            .zip(&types)
            .filter(|(t, &ty)| ty == 3 && in_alphabet(t))
            .map(|(t, _)| AddedToken::from(t.clone(), true).normalized(false))
            .collect();
        inner.add_special_tokens(&control);
        let user: Vec<AddedToken> = spelled
            .iter()
            .zip(&types)
            .filter(|(_, &ty)| ty == 4)
            .map(|(t, _)| AddedToken::from(t.clone(), false).normalized(false))
            .collect();
        inner.add_tokens(&user);

        let id = |key: &str| -> Result<Option<u32>> {
            if g.has_key(key) {
                Ok(Some(g.get_u64(key)? as u32))
            } else {
                Ok(None)
            }
        };
        let add_bos = if g.has_key("tokenizer.ggml.add_bos_token") {
            g.get_bool("tokenizer.ggml.add_bos_token")?
        } else {
            false
        };
        let chat_template = if g.has_key("tokenizer.chat_template") {
            Some(g.get_string("tokenizer.chat_template")?)
        } else {
            None
        };
        Ok(Self {
            inner,
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            add_bos,
            chat_template,
        })
    }

    /// Reads `tokenizer.json` and, where present, `tokenizer_config.json`
    /// (chat template, bos/eos tokens) from a Hugging Face model directory.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::MissingTokenizer {
                dir: dir.to_path_buf(),
            });
        }
        let inner = Tokenizer::from_file(&path).map_err(|e| Error::Tokenizer {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = if cfg_path.exists() {
            clasp_common::json::read_json(&cfg_path)?
        } else {
            serde_json::Value::Null
        };
        let token_id = |key: &str| {
            cfg.get(key)
                .and_then(|v| {
                    v.as_str()
                        .or_else(|| v.get("content").and_then(|c| c.as_str()))
                })
                .and_then(|t| inner.token_to_id(t))
        };
        let chat_template = cfg
            .get("chat_template")
            .and_then(|t| t.as_str())
            .map(String::from)
            .or_else(|| std::fs::read_to_string(dir.join("chat_template.jinja")).ok());
        Ok(Self {
            bos: token_id("bos_token"),
            eos: token_id("eos_token"),
            add_bos: cfg
                .get("add_bos_token")
                .and_then(|b| b.as_bool())
                .unwrap_or(false),
            chat_template,
            inner,
        })
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` into `dir`.
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        let path = dir.join("tokenizer.json");
        self.inner
            .save(&path, false)
            .map_err(|e| Error::Tokenizer {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        let name = |id: Option<u32>| id.and_then(|i| self.inner.id_to_token(i));
        let cfg = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": name(self.bos),
            "eos_token": name(self.eos),
            "pad_token": name(self.eos),
            "add_bos_token": self.add_bos,
            "chat_template": self.chat_template,
            "model_max_length": 1_000_000_000u64,
        });
        let cfg_path = dir.join("tokenizer_config.json");
        let text = serde_json::to_string_pretty(&cfg).map_err(|e| Error::Report(e.to_string()))?;
        std::fs::write(&cfg_path, text).map_err(|e| Error::io(&cfg_path, e))
    }

    /// Adds `token` as a special token matched whole in text (as
    /// transformers' `add_special_tokens`), or finds it when present; its id.
    pub fn add_special_token(&mut self, token: &str) -> u32 {
        if let Some(id) = self.inner.token_to_id(token) {
            return id;
        }
        self.inner
            .add_special_tokens(&[tokenizers::AddedToken::from(token.to_string(), true)]);
        self.inner
            .token_to_id(token)
            .expect("a token just added has an id")
    }

    /// [`Self::add_special_token`] for many tokens in one pass (the
    /// tokenizer rebuilds its matcher once, not once per token); their ids
    /// in order.
    pub fn add_special_tokens(&mut self, tokens: &[String]) -> Vec<u32> {
        let new: Vec<tokenizers::AddedToken> = tokens
            .iter()
            .filter(|t| self.inner.token_to_id(t).is_none())
            .map(|t| tokenizers::AddedToken::from(t.clone(), true))
            .collect();
        self.inner.add_special_tokens(&new);
        tokens
            .iter()
            .map(|t| {
                self.inner
                    .token_to_id(t)
                    .expect("a token just added has an id")
            })
            .collect()
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Token ids of `text`. Special tokens written in the text are matched
    /// whole; with `add_special`, the BOS token is prepended when the
    /// tokenizer asks for it (as transformers' `tokenizer(text)` does).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenize(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_special && self.add_bos {
            if let Some(b) = self.bos {
                ids.push(b);
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::Tokenize(e.to_string()))
    }

    /// Renders the chat template over `messages`, as transformers'
    /// `apply_chat_template(..., tokenize=False)` does.
    pub fn render_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            Error::ChatTemplate("the model has no chat template (tokenizer.chat_template)".into())
        })?;
        render_template(
            template,
            messages,
            add_generation_prompt,
            self.bos.and_then(|i| self.inner.id_to_token(i)),
            self.eos.and_then(|i| self.inner.id_to_token(i)),
        )
    }

    /// Token ids of the rendered chat; the template writes its own special
    /// tokens, so none are added.
    pub fn encode_chat(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        self.encode(&self.render_chat(messages, add_generation_prompt)?, false)
    }
}

/// Renders a Hugging Face chat template with the environment transformers
/// gives it: trimmed blocks, loop controls, `raise_exception`, Python string
/// methods, and the bos/eos token names.
pub fn render_template(
    template: &str,
    messages: &[Message],
    add_generation_prompt: bool,
    bos: Option<String>,
    eos: Option<String>,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template("chat", template)
        .map_err(|e| Error::ChatTemplate(format!("cannot parse: {e}")))?;
    let tmpl = env
        .get_template("chat")
        .map_err(|e| Error::ChatTemplate(e.to_string()))?;
    tmpl.render(minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos.unwrap_or_default(),
        eos_token => eos.unwrap_or_default(),
    })
    .map_err(|e| Error::ChatTemplate(format!("cannot render: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_map_is_gpt2s() {
        let m = bytes_to_unicode();
        assert_eq!(m[b'a' as usize], 'a');
        assert_eq!(m[b' ' as usize], 'Ġ');
        assert_eq!(m[b'\n' as usize], 'Ċ');
        let distinct: std::collections::HashSet<char> = m.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn template_gets_trimmed_blocks_and_python_methods() {
        let t = "{% for m in messages %}\n  {{ m.role.upper() }}: {{ m['content'].strip() }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}";
        let out = render_template(t, &[Message::new("user", "  hi ")], true, None, None).unwrap();
        // lstrip_blocks strips before block tags only, as Jinja2 does.
        assert_eq!(out, "  USER: hi\nA:");
        let e = render_template(
            "{{ raise_exception('no system role') }}",
            &[],
            false,
            None,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("no system role"), "{e}");
    }
}
