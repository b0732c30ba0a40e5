//! `clasp prefs`: preference pairs against object hallucination, built from
//! a caption dataset the ways the hallucination papers build them. The
//! chosen answer is always one of the photo's reference captions; the
//! rejected one is
//! - **swap**: that caption with one object word replaced by an object the
//!   photo does not hold, the one that co-occurs most often with it across
//!   the dataset (as POPE's adversarial negatives are chosen; a random
//!   absent object when none co-occurs);
//! - **other**: the caption of another photo, drawn at random;
//! - **sample**: the model's own sampled caption that mentions an object
//!   absent from the photo (POVID and RLHF-V's self-generated negatives); a
//!   photo whose samples all stay grounded gives no pair.
//!
//! Objects are COCO's categories as CHAIR finds them ([`crate::data::objects`]):
//! a photo holds what its references mention, and its annotated instances
//! where the dataset has them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::data::objects::{self, ObjectWords};
use crate::data::singular::singularize;
use crate::data::PairSet;
use crate::llm::GenerateOptions;
use crate::progress::Progress;
use crate::rng::Rng;
use crate::{Error, Result};
use clasp_vlm::Vlm;

/// How a pair's rejected answer is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PrefMode {
    Swap,
    Other,
    Sample,
}

impl PrefMode {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "swap" => Ok(PrefMode::Swap),
            "other" => Ok(PrefMode::Other),
            "sample" => Ok(PrefMode::Sample),
            o => Err(Error::Report(format!(
                "unknown pair mode {o:?} (swap, other, sample)"
            ))),
        }
    }
}

/// One built pair: a photo, its reference, and the rejected answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BuiltPair {
    pub image: PathBuf,
    pub chosen: String,
    pub rejected: String,
    pub mode: PrefMode,
}

/// Each image's objects: its references' mentions, and `instances` (by file
/// name) where given.
pub fn image_objects(
    set: &PairSet,
    instances: Option<&BTreeMap<String, BTreeSet<String>>>,
) -> Vec<BTreeSet<String>> {
    set.references()
        .iter()
        .zip(&set.images)
        .map(|(refs, img)| objects::image_objects(&img.path(), refs, instances).0)
        .collect()
}

/// The plural of a category name, as captions write it (the last word).
fn plural(name: &str) -> String {
    let (head, last) = name.rsplit_once(' ').map_or(("", name), |(h, l)| (h, l));
    let p = if last == "person" {
        "people".to_string()
    } else if last.ends_with('s')
        || last.ends_with('x')
        || last.ends_with("ch")
        || last.ends_with("sh")
    {
        format!("{last}es")
    } else if last.ends_with('y') && !last.ends_with("ey") && !last.ends_with("ay") {
        format!("{}ies", &last[..last.len() - 1])
    } else {
        format!("{last}s")
    };
    if head.is_empty() {
        p
    } else {
        format!("{head} {p}")
    }
}

/// `caption` with the first mention of object word `word` (singular, maybe
/// two words) replaced by `with`, in the plural where the caption had one,
/// and a preceding "a"/"an" made to agree. None when the word is not found
/// as written.
pub fn swap_word(caption: &str, word: &str, with: &str) -> Option<String> {
    let chunks: Vec<&str> = caption.split(' ').collect();
    let core = |c: &str| {
        c.trim_matches(|ch: char| !ch.is_alphanumeric())
            .to_lowercase()
    };
    let n = word.split(' ').count();
    for i in 0..chunks.len().saturating_sub(n - 1) {
        let span: Vec<String> = chunks[i..i + n].iter().map(|c| core(c)).collect();
        let sing: Vec<String> = span.iter().map(|w| singularize(w)).collect();
        if sing.join(" ") != word {
            continue;
        }
        let was_plural = span.last() != sing.last();
        let new = if was_plural {
            plural(with)
        } else {
            with.to_string()
        };
        let last = chunks[i + n - 1];
        let tail: String = last
            .chars()
            .rev()
            .take_while(|ch| !ch.is_alphanumeric())
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        let mut out: Vec<String> = chunks[..i].iter().map(|s| s.to_string()).collect();
        if !was_plural {
            if let Some(art) = out.last_mut() {
                let vowel = new.starts_with(['a', 'e', 'i', 'o', 'u']);
                match art.as_str() {
                    "a" | "an" => *art = if vowel { "an" } else { "a" }.into(),
                    "A" | "An" => *art = if vowel { "An" } else { "A" }.into(),
                    _ => {}
                }
            }
        }
        out.push(format!("{new}{tail}"));
        out.extend(chunks[i + n..].iter().map(|s| s.to_string()));
        return Some(out.join(" "));
    }
    None
}

/// How often two objects share a photo, each object's partners ranked
/// (ties by name).
fn co_occurrence(objects: &[BTreeSet<String>]) -> BTreeMap<String, Vec<String>> {
    let mut counts: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for o in objects {
        for a in o {
            for b in o.iter().filter(|b| *b != a) {
                *counts
                    .entry(a.clone())
                    .or_default()
                    .entry(b.clone())
                    .or_default() += 1;
            }
        }
    }
    counts
        .into_iter()
        .map(|(a, m)| {
            let mut v: Vec<(String, usize)> = m.into_iter().collect();
            v.sort_by(|x, y| y.1.cmp(&x.1).then(x.0.cmp(&y.0)));
            (a, v.into_iter().map(|(b, _)| b).collect())
        })
        .collect()
}

/// Swap and other-photo pairs: `per_image` of each mode asked, per photo.
pub fn text_pairs(
    set: &PairSet,
    objects: &[BTreeSet<String>],
    modes: &[PrefMode],
    per_image: usize,
    seed: u64,
) -> Vec<BuiltPair> {
    let refs = set.references();
    let words = ObjectWords::coco();
    let co = co_occurrence(objects);
    let all: Vec<&String> = co.keys().collect();
    let mut rng = Rng(seed);
    let mut out = Vec::new();
    for (i, img) in set.images.iter().enumerate() {
        if refs[i].is_empty() {
            continue;
        }
        for &mode in modes {
            for _ in 0..per_image {
                let chosen = refs[i][rng.below(refs[i].len())];
                let rejected = match mode {
                    PrefMode::Other if set.images.len() > 1 => {
                        let j = (i + 1 + rng.below(set.images.len() - 1)) % set.images.len();
                        refs[j].first().map(|s| s.to_string())
                    }
                    PrefMode::Swap => {
                        let ms = words.mentions(chosen);
                        if ms.is_empty() {
                            continue;
                        }
                        let m = &ms[rng.below(ms.len())];
                        // The co-occurring absent objects first, then the
                        // others in random order; the first whose swap CHAIR
                        // reads as a mention of an absent object ("ties"
                        // singularizes to "ty" and is no mention).
                        let absent = |o: &&String| !objects[i].contains(*o);
                        let mut cands: Vec<&String> = co
                            .get(&m.object)
                            .into_iter()
                            .flatten()
                            .filter(absent)
                            .collect();
                        let mut rest: Vec<&String> = all.iter().copied().filter(absent).collect();
                        rng.shuffle(&mut rest);
                        cands.extend(rest);
                        cands.into_iter().take(16).find_map(|w| {
                            swap_word(chosen, &m.word, w).filter(|r| {
                                words
                                    .mentions(r)
                                    .iter()
                                    .any(|x| !objects[i].contains(&x.object))
                            })
                        })
                    }
                    _ => None,
                };
                if let Some(r) = rejected.filter(|r| r != chosen) {
                    out.push(BuiltPair {
                        image: img.path(),
                        chosen: chosen.to_string(),
                        rejected: r,
                        mode,
                    });
                }
            }
        }
    }
    out
}

/// Sampled pairs: up to `tries` sampled captions per photo (`batch` photos
/// at a time, `opts`' sampling), the first that mentions an absent object
/// rejected against a reference.
pub fn sampled_pairs(
    vlm: &Vlm,
    set: &PairSet,
    objects: &[BTreeSet<String>],
    tries: usize,
    opts: &GenerateOptions,
    batch: usize,
    progress: &dyn Progress,
) -> Result<Vec<BuiltPair>> {
    let refs = set.references();
    let words = ObjectWords::coco();
    let user = Vlm::caption_turn(clasp_vlm::model::DESCRIBE_EN);
    let mut found: Vec<Option<String>> = vec![None; set.images.len()];
    let mut rng = Rng(opts.sampling.seed);
    for t in 0..tries {
        let open: Vec<usize> = (0..set.images.len())
            .filter(|&i| found[i].is_none())
            .collect();
        let imgs: Vec<_> = open.iter().map(|&i| set.images[i].clone()).collect();
        let mut o = opts.clone();
        o.sampling.seed = opts.sampling.seed.wrapping_add(t as u64 * 0x9E37_79B9);
        let got = clasp_vlm::caption::caption_images(vlm, &imgs, &user, &o, batch, progress)?;
        for (&i, g) in open.iter().zip(got) {
            match g {
                Ok(g) => {
                    let text = g.text.trim().to_string();
                    if words
                        .mentions(&text)
                        .iter()
                        .any(|m| !objects[i].contains(&m.object))
                    {
                        found[i] = Some(text);
                    }
                }
                Err(e) => tracing::warn!("{}: {e}", set.images[i].path().display()),
            }
        }
    }
    Ok(found
        .into_iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let r = r?;
            let chosen = *refs[i].get(rng.below(refs[i].len().max(1)))?;
            Some(BuiltPair {
                image: set.images[i].path(),
                chosen: chosen.to_string(),
                rejected: r,
                mode: PrefMode::Sample,
            })
        })
        .collect())
}

/// Writes the pairs as TRL's conversational JSON lines, the user turn an
/// image and `instruction`, the image's absolute path in `images`.
pub fn write_pairs(path: &Path, pairs: &[BuiltPair], instruction: &str) -> Result<()> {
    let mut text = String::new();
    for p in pairs {
        let image = std::fs::canonicalize(&p.image).unwrap_or_else(|_| p.image.clone());
        let line = serde_json::json!({
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}],
            "chosen": [{"role": "assistant", "content": p.chosen}],
            "rejected": [{"role": "assistant", "content": p.rejected}],
            "images": [image.display().to_string()],
        });
        text.push_str(&line.to_string());
        text.push('\n');
    }
    crate::atomic::write_bytes(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swapping_keeps_number_punctuation_and_articles() {
        assert_eq!(
            swap_word("A dog runs.", "dog", "elephant").unwrap(),
            "An elephant runs."
        );
        assert_eq!(
            swap_word("Two dogs, a ball", "dog", "cat").unwrap(),
            "Two cats, a ball"
        );
        assert_eq!(
            swap_word("two men sit", "man", "bus").unwrap(),
            "two buses sit"
        );
        assert_eq!(
            swap_word("a hot dog stand", "hot dog", "pizza").unwrap(),
            "a pizza stand"
        );
        assert_eq!(
            swap_word("a puppy plays", "puppy", "teddy bear").unwrap(),
            "a teddy bear plays"
        );
        assert_eq!(swap_word("a cat", "dog", "cow"), None);
        assert_eq!(plural("person"), "people");
        assert_eq!(plural("teddy bear"), "teddy bears");
    }
}
