//! CHAIR (Rohrbach et al. 2018, "Object Hallucination in Image Captioning"):
//! the share of object mentions in generated captions that name an object
//! the image does not hold (CHAIR_i), and the share of captions with at least
//! one such mention (CHAIR_s). Computed as the paper's `chair.py` computes
//! it, over the object mentions [`ObjectWords`] finds (its word list and
//! rules), every mention counted, repeats included.
//!
//! What the image holds comes from COCO's instance annotations together with
//! the objects its reference captions mention (the paper's union), or from
//! the references alone where a dataset has no annotations; [`Truth`] says
//! which.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Serialize;

pub use crate::data::objects::{coco_instances, image_objects, words, Mention, ObjectWords};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Truth {
    /// COCO instance annotations and the reference captions' mentions.
    InstancesAndReferences,
    /// The reference captions' mentions alone.
    References,
}

impl Truth {
    /// Where the objects came from, in words.
    pub fn describe(self) -> &'static str {
        match self {
            Truth::InstancesAndReferences => "COCO's instance annotations and the references",
            Truth::References => "the references' mentions",
        }
    }
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
    let mut unannotated = 0;
    let objects: Vec<BTreeSet<String>> = images
        .iter()
        .zip(references)
        .map(|(img, refs)| {
            let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
            let (o, listed) = image_objects(Path::new(img), &refs, instances);
            unannotated += usize::from(!listed);
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

#[cfg(test)]
mod tests {
    use super::*;

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
