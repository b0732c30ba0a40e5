//! CHAIR (Rohrbach et al. 2018, "Object Hallucination in Image Captioning"):
//! the share of object mentions in generated captions that name an object
//! the image does not hold (CHAIR_i), and the share of captions with at least
//! one such mention (CHAIR_s). Computed as the paper's `chair.py` computes
//! it: its word list (COCO's 80 categories and their synonyms,
//! `chair_synonyms.txt`, parsed with its quirks), every word singularized by
//! Pattern's rules ([`crate::singular`]), its two-word objects and
//! qualifiers ("baby bird" is a bird, not a person; "toilet seat" is no
//! chair), and every mention counted, repeats included.
//!
//! What the image holds comes from COCO's instance annotations together with
//! the objects its reference captions mention (the paper's union), or from
//! the references alone where a dataset has no annotations; [`Truth`] says
//! which. The paper tokenizes with NLTK's `word_tokenize`; [`words`] splits
//! the same way where an object word can be affected (punctuation, the
//! clitics 's n't 're 've 'll 'd 'm, sentence-final periods).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::singular::singularize;
use crate::{Error, Result};

const SYNONYMS: &str = include_str!("chair_synonyms.txt");

/// Two-word objects the paper joins before looking words up.
const DOUBLE_WORDS: &[&str] = &[
    "motor bike",
    "motor cycle",
    "air plane",
    "traffic light",
    "street light",
    "traffic signal",
    "stop light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "suit case",
    "sports ball",
    "baseball bat",
    "baseball glove",
    "tennis racket",
    "wine glass",
    "hot dog",
    "cell phone",
    "mobile phone",
    "teddy bear",
    "hair drier",
    "potted plant",
    "bow tie",
    "laptop computer",
    "stove top oven",
    "home plate",
    "train track",
];
/// "baby X" and "adult X" are an X (not a person).
const ANIMALS: &[&str] = &[
    "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
    "animal", "cub",
];
/// "passenger X" is an X (not a person).
const VEHICLES: &[&str] = &["jet", "train"];

/// COCO's object words: every synonym, its category, and the two-word rules.
pub struct ObjectWords {
    objects: HashSet<String>,
    category: HashMap<String, String>,
    double: HashMap<String, String>,
}

/// One object mention in a caption.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mention {
    /// The word as found (singularized, two-word objects joined).
    pub word: String,
    /// Its COCO category.
    pub object: String,
}

impl ObjectWords {
    /// The paper's list, built once.
    pub fn coco() -> &'static ObjectWords {
        static WORDS: OnceLock<ObjectWords> = OnceLock::new();
        WORDS.get_or_init(|| {
            let (mut objects, mut category) = (HashSet::new(), HashMap::new());
            for line in SYNONYMS.lines() {
                // `s.strip().split(', ')`, so "scooter,  motor bike" keeps a
                // leading space on " motor bike" and that synonym never matches.
                let names: Vec<&str> = line.trim().split(", ").collect();
                for n in &names {
                    objects.insert(n.to_string());
                    category.insert(n.to_string(), names[0].to_string());
                }
            }
            let mut double: HashMap<String, String> = DOUBLE_WORDS
                .iter()
                .map(|w| (w.to_string(), w.to_string()))
                .collect();
            for a in ANIMALS {
                double.insert(format!("baby {a}"), a.to_string());
                double.insert(format!("adult {a}"), a.to_string());
            }
            for v in VEHICLES {
                double.insert(format!("passenger {v}"), v.to_string());
            }
            double.insert("bow tie".into(), "tie".into());
            double.insert("toilet seat".into(), "toilet".into());
            double.insert("wine glas".into(), "wine glass".into());
            ObjectWords {
                objects,
                category,
                double,
            }
        })
    }

    /// The category of a category name or synonym, as written in the list.
    pub fn category(&self, name: &str) -> Option<&str> {
        self.category.get(name).map(String::as_str)
    }

    /// Every object mention in `caption`, in order, repeats included.
    pub fn mentions(&self, caption: &str) -> Vec<Mention> {
        let words: Vec<String> = words(&caption.to_lowercase())
            .iter()
            .map(|w| singularize(w))
            .collect();
        let mut joined = Vec::with_capacity(words.len());
        let mut i = 0;
        while i < words.len() {
            let pair = words.get(i + 1).map(|next| format!("{} {next}", words[i]));
            match pair.and_then(|p| self.double.get(&p)) {
                Some(w) => {
                    joined.push(w.clone());
                    i += 2;
                }
                None => {
                    joined.push(words[i].clone());
                    i += 1;
                }
            }
        }
        if joined.iter().any(|w| w == "toilet") && joined.iter().any(|w| w == "seat") {
            joined.retain(|w| w != "seat");
        }
        joined
            .into_iter()
            .filter(|w| self.objects.contains(w))
            .map(|w| Mention {
                object: self.category[&w].clone(),
                word: w,
            })
            .collect()
    }

    /// The categories `captions` mention.
    pub fn objects_of<'a>(&self, captions: impl IntoIterator<Item = &'a str>) -> BTreeSet<String> {
        captions
            .into_iter()
            .flat_map(|c| self.mentions(c))
            .map(|m| m.object)
            .collect()
    }
}

/// `word_tokenize`'s words where they matter here: sentences end at a period,
/// question or exclamation mark followed by a space (or the end); a word loses
/// its surrounding punctuation and its clitic ("dog's" is "dog" and "'s");
/// hyphenated and slashed words stay whole.
pub fn words(text: &str) -> Vec<String> {
    const LEAD: &[char] = &['"', '\'', '(', '[', '{', '<', '`'];
    const TRAIL: &[char] = &[
        ',', ';', ':', '!', '?', '.', '"', '\'', ')', ']', '}', '>', '`',
    ];
    const CLITICS: &[&str] = &["n't", "'s", "'re", "'ve", "'ll", "'d", "'m"];
    let mut out = Vec::new();
    for chunk in text.split_whitespace() {
        let mut w = chunk.trim_start_matches(LEAD);
        let mut tail = Vec::new();
        loop {
            let t = w.trim_end_matches(TRAIL);
            if t.len() != w.len() {
                w = t;
                continue;
            }
            match CLITICS
                .iter()
                .find(|c| w.len() > c.len() && w.ends_with(*c))
            {
                Some(c) => {
                    tail.push(c.to_string());
                    w = &w[..w.len() - c.len()];
                }
                None => break,
            }
        }
        if !w.is_empty() {
            out.push(w.to_string());
        }
        out.extend(tail.into_iter().rev());
    }
    out
}

/// Where an image's objects come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Truth {
    /// COCO instance annotations and the reference captions' mentions.
    InstancesAndReferences,
    /// The reference captions' mentions alone.
    References,
}

/// One caption's CHAIR.
#[derive(Debug, Clone, Serialize)]
pub struct CaptionChair {
    pub mentions: Vec<Mention>,
    /// The mentions of objects the image does not hold.
    pub hallucinated: Vec<Mention>,
}

/// CHAIR over a set of captions.
#[derive(Debug, Clone, Serialize)]
pub struct ChairScores {
    /// Hallucinated mentions / all mentions.
    pub chair_i: f64,
    /// Captions with a hallucinated mention / all captions.
    pub chair_s: f64,
    pub captions: usize,
    pub mentions: usize,
    pub hallucinated_mentions: usize,
    pub hallucinated_captions: usize,
    pub truth: Truth,
    pub per_caption: Vec<CaptionChair>,
}

/// CHAIR of `captions[i]` against the objects `truth[i]` of its image.
pub fn chair(captions: &[&str], objects: &[BTreeSet<String>], truth: Truth) -> ChairScores {
    let words = ObjectWords::coco();
    let per_caption: Vec<CaptionChair> = captions
        .iter()
        .zip(objects)
        .map(|(c, present)| {
            let mentions = words.mentions(c);
            let hallucinated = mentions
                .iter()
                .filter(|m| !present.contains(&m.object))
                .cloned()
                .collect();
            CaptionChair {
                mentions,
                hallucinated,
            }
        })
        .collect();
    let mentions: usize = per_caption.iter().map(|c| c.mentions.len()).sum();
    let bad: usize = per_caption.iter().map(|c| c.hallucinated.len()).sum();
    let bad_caps = per_caption
        .iter()
        .filter(|c| !c.hallucinated.is_empty())
        .count();
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    ChairScores {
        chair_i: ratio(bad, mentions),
        chair_s: ratio(bad_caps, per_caption.len()),
        captions: per_caption.len(),
        mentions,
        hallucinated_mentions: bad,
        hallucinated_captions: bad_caps,
        truth,
        per_caption,
    }
}

/// CHAIR of one caption per image against its own image's objects, and
/// against the objects of another image (the derangement of
/// [`crate::captioning::score_captions`]: image i against i + ⌊n/2⌋ mod n),
/// the grounding control.
#[derive(Debug, Clone, Serialize)]
pub struct Hallucination {
    pub own: ChairScores,
    pub wrong_photos: ChairScores,
    /// Images the instances file does not list (their references alone count).
    pub unannotated: usize,
}

/// [`Hallucination`] of `captions[i]` on image `images[i]` (a path: its file
/// name is looked up in `instances`) with references `references[i]`.
pub fn hallucination(
    images: &[&str],
    captions: &[&str],
    references: &[&[String]],
    instances: Option<&BTreeMap<String, BTreeSet<String>>>,
) -> Hallucination {
    let words = ObjectWords::coco();
    let mut unannotated = 0;
    let objects: Vec<BTreeSet<String>> = images
        .iter()
        .zip(references)
        .map(|(img, refs)| {
            let mut o = words.objects_of(refs.iter().map(String::as_str));
            if let Some(inst) = instances {
                let file = Path::new(img).file_name().map(|f| f.to_string_lossy());
                match file.and_then(|f| inst.get(f.as_ref())) {
                    Some(found) => o.extend(found.iter().cloned()),
                    None => unannotated += 1,
                }
            }
            o
        })
        .collect();
    let truth = match instances {
        Some(_) => Truth::InstancesAndReferences,
        None => Truth::References,
    };
    let n = objects.len();
    let shift = (n / 2).max(1);
    let deranged: Vec<BTreeSet<String>> =
        (0..n).map(|i| objects[(i + shift) % n].clone()).collect();
    Hallucination {
        own: chair(captions, &objects, truth),
        wrong_photos: chair(captions, &deranged, truth),
        unannotated,
    }
}

#[derive(Deserialize)]
struct Instances {
    images: Vec<InstImage>,
    annotations: Vec<InstAnn>,
    categories: Vec<InstCat>,
}
#[derive(Deserialize)]
struct InstImage {
    id: u64,
    file_name: String,
}
#[derive(Deserialize)]
struct InstAnn {
    image_id: u64,
    category_id: u64,
}
#[derive(Deserialize)]
struct InstCat {
    id: u64,
    name: String,
}

/// The categories annotated on each image of a COCO instances file, by file
/// name (images without annotations hold none).
pub fn coco_instances(path: &Path) -> Result<BTreeMap<String, BTreeSet<String>>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Report(format!("{}: {e}", path.display())))?;
    let inst: Instances = serde_json::from_str(&text).map_err(|e| {
        Error::Report(format!(
            "{}: not a COCO instances file: {e}",
            path.display()
        ))
    })?;
    let words = ObjectWords::coco();
    let names: HashMap<u64, &str> = inst
        .categories
        .iter()
        .map(|c| (c.id, words.category(&c.name).unwrap_or(&c.name)))
        .collect();
    let files: HashMap<u64, &str> = inst
        .images
        .iter()
        .map(|i| (i.id, i.file_name.as_str()))
        .collect();
    let mut out: BTreeMap<String, BTreeSet<String>> = files
        .values()
        .map(|f| (f.to_string(), BTreeSet::new()))
        .collect();
    for a in &inst.annotations {
        let (Some(file), Some(name)) = (files.get(&a.image_id), names.get(&a.category_id)) else {
            return Err(Error::Report(format!(
                "{}: annotation of image {} names an unknown image or category {}",
                path.display(),
                a.image_id,
                a.category_id
            )));
        };
        out.entry(file.to_string())
            .or_default()
            .insert(name.to_string());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn objs(c: &str) -> Vec<String> {
        ObjectWords::coco()
            .mentions(c)
            .into_iter()
            .map(|m| m.object)
            .collect()
    }

    #[test]
    fn the_papers_rules() {
        assert_eq!(objs("Two dogs' toys and a man."), ["dog", "person"]);
        assert_eq!(
            objs("a baby elephant near a hot dog stand"),
            ["elephant", "hot dog"]
        );
        assert_eq!(objs("a toilet seat"), ["toilet"]);
        assert_eq!(objs("a passenger train on the train track"), ["train"]);
        assert_eq!(objs("wine glasses"), ["wine glass"]);
        // Pattern's "bus" -> "bu": the paper never counts a singular bus.
        assert_eq!(objs("a bus and two buses"), ["bus"]);
        assert_eq!(objs("a motor bike"), Vec::<String>::new());
    }

    #[test]
    fn tokens() {
        assert_eq!(
            words("the dog's ball. (cats) don't run-away!"),
            ["the", "dog", "'s", "ball", "cats", "do", "n't", "run-away"]
        );
    }

    #[test]
    fn scores_count_every_mention() {
        let truth: Vec<BTreeSet<String>> = vec![
            ["dog".to_string()].into(),
            ["person".to_string(), "dog".to_string()].into(),
        ];
        let s = chair(
            &["a dog and a cat and a cat", "a man with his dog"],
            &truth,
            Truth::References,
        );
        assert_eq!((s.mentions, s.hallucinated_mentions), (5, 2));
        assert_eq!(s.hallucinated_captions, 1);
        assert!((s.chair_i - 0.4).abs() < 1e-12 && (s.chair_s - 0.5).abs() < 1e-12);
    }
}
