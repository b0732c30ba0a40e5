//! Preference pairs in TRL's format: JSON lines with `prompt`, `chosen` and
//! `rejected`, each a string (the standard form) or a list of chat messages
//! (the conversational form), and for vision-language pairs `images`, a list
//! of image paths (relative to the file). A bad line (not JSON, a missing
//! or mistyped key, a chosen equal to its rejected, forms mixed within the
//! line, an image that is not there) is reported with its line number and
//! left out; the rest load.
//!
//! Tokenized as TRL's `DPOTrainer` tokenizes (`_prepare_dataset`): the
//! prompt alone (with the generation prompt, for chats) and the prompt with
//! each completion, the completion starting where the two token sequences
//! part; the standard form gets the end-of-sequence token appended to both
//! completions first.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::data::{DataIssue, Loc};
use crate::llm::{LlmTokenizer, Message};
use crate::{Error, Result};

/// A prompt or completion: text, or chat messages.
#[derive(Debug, Clone, PartialEq)]
pub enum Turns {
    Text(String),
    Chat(Vec<Message>),
}

/// One preference pair.
#[derive(Debug, Clone, PartialEq)]
pub struct PrefPair {
    /// 1-based line in its file.
    pub line: usize,
    pub prompt: Turns,
    pub chosen: Turns,
    pub rejected: Turns,
    pub images: Vec<PathBuf>,
}

/// A loaded preference file: its valid pairs and what was left out.
#[derive(Debug, Clone, Default)]
pub struct PrefSet {
    pub pairs: Vec<PrefPair>,
    pub issues: Vec<DataIssue>,
}

/// Token ids of a pair, as TRL splits them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairIds {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
}

fn turns(v: Option<&Value>, key: &str) -> std::result::Result<Turns, String> {
    match v {
        None | Some(Value::Null) => Err(format!("no `{key}`")),
        Some(Value::String(s)) => Ok(Turns::Text(s.clone())),
        Some(Value::Array(msgs)) => msgs
            .iter()
            .map(|m| {
                let role = m.get("role").and_then(Value::as_str);
                let content = m.get("content").map(content_text);
                match (role, content) {
                    (Some(r), Some(Some(c))) => Ok(Message::new(r, &c)),
                    _ => Err(format!(
                        "`{key}`: a message without a string `role` and `content`"
                    )),
                }
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map(Turns::Chat),
        Some(_) => Err(format!(
            "`{key}` is neither a string nor a list of messages"
        )),
    }
}

/// A message's content: a string, or TRL's typed parts, where an image part
/// becomes the `<image>` placeholder.
fn content_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => parts
            .iter()
            .map(|p| match p.get("type").and_then(Value::as_str) {
                Some("image") => Some("<image>".to_string()),
                Some("text") => p.get("text").and_then(Value::as_str).map(str::to_string),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .map(|v| v.join("\n")),
        _ => None,
    }
}

fn parse_line(v: &Value, dir: &Path, line: usize) -> std::result::Result<PrefPair, String> {
    if !v.is_object() {
        return Err("not a JSON object".into());
    }
    let (prompt, chosen, rejected) = (
        turns(v.get("prompt"), "prompt")?,
        turns(v.get("chosen"), "chosen")?,
        turns(v.get("rejected"), "rejected")?,
    );
    let chat = |t: &Turns| matches!(t, Turns::Chat(_));
    if chat(&prompt) != chat(&chosen) || chat(&chosen) != chat(&rejected) {
        return Err("prompt, chosen and rejected mix text and chat messages".into());
    }
    if chosen == rejected {
        return Err("`chosen` equals `rejected`".into());
    }
    let images = match v.get("images").or_else(|| v.get("image")) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![dir.join(s)],
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map(|s| dir.join(s)))
            .collect::<Option<Vec<_>>>()
            .ok_or("`images` holds something other than paths")?,
        Some(_) => return Err("`images` is neither a path nor a list of paths".into()),
    };
    if let Some(missing) = images.iter().find(|p| !p.is_file()) {
        return Err(format!("image {} does not exist", missing.display()));
    }
    Ok(PrefPair {
        line,
        prompt,
        chosen,
        rejected,
        images,
    })
}

/// Reads a JSON-lines preference file.
pub fn load_prefs(path: &Path) -> Result<PrefSet> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut set = PrefSet::default();
    for (i, l) in text.lines().enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        let parsed = serde_json::from_str::<Value>(l)
            .map_err(|e| format!("not JSON: {e}"))
            .and_then(|v| parse_line(&v, dir, i + 1));
        match parsed {
            Ok(p) => set.pairs.push(p),
            Err(message) => set.issues.push(DataIssue {
                loc: Loc::new(path, i + 1),
                message,
                dropped_images: 0,
                dropped_captions: 1,
            }),
        }
    }
    if set.pairs.is_empty() {
        let why = set
            .issues
            .first()
            .map_or("it has no lines".to_string(), |i| i.to_string());
        return Err(Error::Report(format!(
            "{}: no valid preference pair ({why})",
            path.display()
        )));
    }
    Ok(set)
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn chat_of(t: &Turns) -> &[Message] {
    match t {
        Turns::Chat(m) => m,
        Turns::Text(_) => &[],
    }
}

/// The pair's token ids, split as TRL splits them.
pub fn tokenize_pair(tok: &LlmTokenizer, p: &PrefPair) -> Result<PairIds> {
    let (prompt, with_chosen, with_rejected) = match (&p.prompt, &p.chosen, &p.rejected) {
        (Turns::Text(pr), Turns::Text(c), Turns::Text(r)) => {
            let eos = tok
                .eos_id()
                .and_then(|e| tok.inner().id_to_token(e))
                .ok_or_else(|| {
                    Error::Report("the tokenizer has no end-of-sequence token".into())
                })?;
            let close = |s: &str| {
                if s.ends_with(&eos) {
                    s.to_string()
                } else {
                    format!("{s}{eos}")
                }
            };
            (
                tok.encode(pr, true)?,
                tok.encode(&format!("{pr}{}", close(c)), true)?,
                tok.encode(&format!("{pr}{}", close(r)), true)?,
            )
        }
        _ => {
            let pr = chat_of(&p.prompt);
            let join = |c: &Turns| [pr, chat_of(c)].concat();
            (
                tok.encode_chat(pr, true)?,
                tok.encode_chat(&join(&p.chosen), false)?,
                tok.encode_chat(&join(&p.rejected), false)?,
            )
        }
    };
    let n = common_prefix(&prompt, &with_chosen).min(common_prefix(&prompt, &with_rejected));
    Ok(PairIds {
        prompt: prompt[..n].to_vec(),
        chosen: with_chosen[n..].to_vec(),
        rejected: with_rejected[n..].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_lines_are_named_and_the_rest_load() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("prefs.jsonl");
        let lines = [
            r#"{"prompt": "Q", "chosen": "good", "rejected": "bad"}"#,
            r#"{"prompt": "Q", "chosen": "good"}"#,
            r#"{"prompt": "Q", "chosen": "same", "rejected": "same"}"#,
            r#"not json"#,
            r#"{"prompt": [{"role": "user", "content": "Q"}], "chosen": "a", "rejected": "b"}"#,
            r#"{"prompt": "Q", "chosen": "a", "rejected": "b", "images": ["nope.jpg"]}"#,
            r#"{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}], "chosen": [{"role": "assistant", "content": "a dog"}], "rejected": [{"role": "assistant", "content": "a cat"}]}"#,
        ];
        std::fs::write(&p, lines.join("\n")).unwrap();
        let set = load_prefs(&p).unwrap();
        assert_eq!(set.pairs.iter().map(|x| x.line).collect::<Vec<_>>(), [1, 7]);
        let why: Vec<(usize, &str)> = set
            .issues
            .iter()
            .map(|i| (i.loc.line, i.message.as_str()))
            .collect();
        assert_eq!(why[0], (2, "no `rejected`"));
        assert_eq!(why[1], (3, "`chosen` equals `rejected`"));
        assert!(why[2].0 == 4 && why[2].1.starts_with("not JSON"));
        assert_eq!(why[3].0, 5);
        assert!(why[4].0 == 6 && why[4].1.contains("nope.jpg"), "{why:?}");
        assert_eq!(
            set.pairs[1].prompt,
            Turns::Chat(vec![Message::new("user", "<image>\nDescribe.")])
        );
    }
}
