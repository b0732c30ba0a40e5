//! COCO's 80 object categories as they are named in captions, with the
//! word list and rules of CHAIR's code (Rohrbach et al. 2018, `chair.py`):
//! its synonyms (`coco_synonyms.txt`, parsed with its quirks), every word
//! singularized by Pattern's rules ([`super::singular`]), its two-word
//! objects and qualifiers ("baby bird" is a bird, not a person; "toilet
//! seat" is no chair). CHAIR (`clasp_eval::chair`), POPE's objects and the
//! preference pairs of `clasp prefs` all read captions through it; COCO's
//! instance annotations are read here too.
//!
//! The paper tokenizes with NLTK's `word_tokenize`; [`words`] splits the
//! same way where an object word can be affected (punctuation, the clitics
//! 's n't 're 've 'll 'd 'm, sentence-final periods).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use super::singular::singularize;
use crate::{Error, Result};

const SYNONYMS: &str = include_str!("coco_synonyms.txt");

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

/// COCO's `instances_X.json` beside a `captions_X.json`, if there is one.
pub fn instances_beside(captions: &Path) -> Option<std::path::PathBuf> {
    let split = captions.file_name()?.to_str()?.strip_prefix("captions_")?;
    let p = captions.with_file_name(format!("instances_{split}"));
    p.is_file().then_some(p)
}

/// An image's objects as CHAIR collects them: what its `references`
/// mention, and its annotated `instances` (looked up by the image's file
/// name) where given. The flag is false when instances were given but do not
/// list the image.
pub fn image_objects(
    image: &Path,
    references: &[&str],
    instances: Option<&BTreeMap<String, BTreeSet<String>>>,
) -> (BTreeSet<String>, bool) {
    let mut o = ObjectWords::coco().objects_of(references.iter().copied());
    let Some(inst) = instances else {
        return (o, true);
    };
    let file = image.file_name().map(|f| f.to_string_lossy());
    match file.and_then(|f| inst.get(f.as_ref())) {
        Some(found) => {
            o.extend(found.iter().cloned());
            (o, true)
        }
        None => (o, false),
    }
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
}
