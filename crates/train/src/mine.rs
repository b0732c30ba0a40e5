//! Offline hard-negative mining for the triplet objective (`clasp mine`).
//!
//! For each caption, a text encoder finds the `top_k` most similar captions of
//! *other* images. A candidate is kept as a hard negative when it is similar
//! but not a paraphrase:
//! - its cosine lies in the window [lo, hi] (above hi, a paraphrase is likely);
//! - and the two captions conflict lexically: they name different colours or
//!   different counts, or (English) different actions (`-ing` verbs). Without
//!   such a conflict, a close caption may well describe the image too.
//!
//! The result is a JSON file; `clasp train --negatives FILE` then puts each
//! mined negative's pair into the same batch as its anchor.

use std::collections::BTreeSet;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::data::PairSet;
use crate::vecmath::dot;
use crate::{Error, Result};

const COLOURS_EN: &[&str] = &[
    "black", "white", "red", "blue", "green", "yellow", "orange", "pink", "purple", "brown",
    "gray", "grey", "silver", "gold", "tan",
];
const COUNTS_EN: &[&str] = &[
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "single",
    "couple", "pair", "several", "many", "group", "crowd",
];
/// Words ending in -ing that name things, not actions.
const NOT_ACTIONS_EN: &[&str] = &[
    "something",
    "anything",
    "nothing",
    "everything",
    "thing",
    "building",
    "clothing",
    "ceiling",
    "morning",
    "evening",
    "wedding",
    "railing",
    "swing",
    "string",
    "spring",
    "sling",
    "sibling",
    "pudding",
    "stuffing",
    "awning",
    "bedding",
    "lightning",
    "wing",
    "ring",
    "king",
    "during",
];
const COLOURS_ZH: &[&str] = &[
    "黑", "白", "红", "蓝", "绿", "黄", "橙", "粉", "紫", "棕", "灰", "银", "金",
];
const COUNTS_ZH: &[&str] = &[
    "一个", "两个", "三个", "四个", "五个", "一只", "两只", "三只", "一群", "几个", "很多",
];

/// The colour, count and action words of a caption.
#[derive(Debug, Default, PartialEq)]
pub struct Cues {
    pub colours: BTreeSet<String>,
    pub counts: BTreeSet<String>,
    pub actions: BTreeSet<String>,
}

pub fn cues(caption: &str) -> Cues {
    let lower = caption.to_lowercase();
    let mut c = Cues::default();
    for w in lower
        .split(|ch: char| !ch.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        if COLOURS_EN.contains(&w) {
            c.colours.insert(w.replace("grey", "gray"));
        } else if COUNTS_EN.contains(&w) || w.chars().all(|ch| ch.is_ascii_digit()) {
            c.counts.insert(w.to_string());
        } else if w.len() > 4 && w.ends_with("ing") && w.is_ascii() && !NOT_ACTIONS_EN.contains(&w)
        {
            c.actions.insert(w.to_string());
        }
    }
    for z in COLOURS_ZH {
        if lower.contains(z) {
            c.colours.insert(z.to_string());
        }
    }
    for z in COUNTS_ZH {
        if lower.contains(z) {
            c.counts.insert(z.to_string());
        }
    }
    c
}

/// Why two captions cannot both describe one scene, if they say so: both
/// name colours (counts, actions) and the sets differ.
pub fn conflict(a: &str, b: &str) -> Option<String> {
    let (x, y) = (cues(a), cues(b));
    let clash = |p: &BTreeSet<String>, q: &BTreeSet<String>, what: &str| {
        (!p.is_empty() && !q.is_empty() && p != q).then(|| {
            let j = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>().join("+");
            format!("{what}: {} / {}", j(p), j(q))
        })
    };
    clash(&x.colours, &y.colours, "colour")
        .or_else(|| clash(&x.counts, &y.counts, "count"))
        .or_else(|| clash(&x.actions, &y.actions, "action"))
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Negative {
    pub caption: usize,
    pub cosine: f32,
    pub conflict: String,
}

/// The mined negatives of a caption set; `anchors[c]` lists caption c's.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MinedNegatives {
    pub dataset: String,
    pub model: String,
    pub top_k: usize,
    pub window: (f32, f32),
    /// The captions the indices refer to, to check the file fits the data.
    pub captions: Vec<String>,
    pub anchors: Vec<Vec<Negative>>,
}

impl MinedNegatives {
    /// Selects, for each caption, the hard negatives among its `top_k`
    /// nearest captions of other images. `emb` holds unit rows, one per
    /// caption; `progress` counts finished captions.
    pub fn mine(
        set: &PairSet,
        emb: &[Vec<f32>],
        top_k: usize,
        window: (f32, f32),
        progress: &dyn crate::progress::Progress,
    ) -> Vec<Vec<Negative>> {
        use rayon::prelude::*;
        (0..set.captions.len())
            .into_par_iter()
            .map(|a| {
                let img = set.caption_image[a];
                let mut near: Vec<(f32, usize)> = (0..emb.len())
                    .filter(|&b| set.caption_image[b] != img)
                    .map(|b| (dot(&emb[a], &emb[b]), b))
                    .collect();
                let k = top_k.min(near.len());
                if k > 0 {
                    near.select_nth_unstable_by(k - 1, |x, y| y.0.total_cmp(&x.0));
                }
                near.truncate(k);
                near.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
                let kept = near
                    .into_iter()
                    .filter(|(c, _)| *c >= window.0 && *c <= window.1)
                    .filter_map(|(c, b)| {
                        conflict(&set.captions[a], &set.captions[b]).map(|why| Negative {
                            caption: b,
                            cosine: c,
                            conflict: why,
                        })
                    })
                    .collect();
                progress.inc(1);
                kept
            })
            .collect()
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(self).expect("negatives serialise"))
            .map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    }

    /// Reads a file and checks that it was mined from these captions.
    pub fn load(path: &Path, set: &PairSet) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let m: Self = serde_json::from_slice(&bytes).map_err(|e| {
            Error::Report(format!("{}: not a `clasp mine` file ({e})", path.display()))
        })?;
        if m.captions != set.captions {
            return Err(Error::Report(format!(
                "{}: mined from other captions ({} there, {} in the training split); mine this split again",
                path.display(),
                m.captions.len(),
                set.captions.len()
            )));
        }
        Ok(m)
    }

    /// A batch with mined negatives in it: for the first pairs of the batch
    /// whose caption has a negative, the negative's (image, caption) pair
    /// replaces a pair at the end of the batch, at most `share` of the batch
    /// and never repeating an image. A pure function of the batch, so a
    /// resumed run builds the same batches.
    pub fn fill(&self, set: &PairSet, batch: &mut [(usize, usize)], share: f64) {
        let n = batch.len();
        let budget = ((n as f64) * share).floor() as usize;
        let mut images: BTreeSet<usize> = batch.iter().map(|p| p.0).collect();
        let mut slot = n;
        let mut a = 0;
        while a < slot && n - slot < budget {
            let (_, cap) = batch[a];
            if let Some(neg) = self.anchors[cap]
                .iter()
                .find(|g| !images.contains(&set.caption_image[g.caption]))
            {
                slot -= 1;
                if slot <= a {
                    break;
                }
                images.remove(&batch[slot].0);
                let img = set.caption_image[neg.caption];
                images.insert(img);
                batch[slot] = (img, neg.caption);
            }
            a += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflicts_name_colours_counts_and_actions_and_spare_paraphrases() {
        assert_eq!(
            conflict("A black dog runs", "a white dog runs").as_deref(),
            Some("colour: black / white")
        );
        assert_eq!(
            conflict("two children play", "Three children play").as_deref(),
            Some("count: two / three")
        );
        assert_eq!(
            conflict("a man is running on grass", "a man is sitting on grass").as_deref(),
            Some("action: running / sitting")
        );
        assert_eq!(
            conflict("一只黑狗在草地上", "一只白狗在草地上").as_deref(),
            Some("colour: 黑 / 白")
        );
        // Paraphrases and captions that do not both say: no conflict.
        assert_eq!(
            conflict("a dog runs on the grass", "a dog is on a lawn"),
            None
        );
        assert_eq!(conflict("a grey cat", "a gray cat"), None);
        assert_eq!(conflict("a black dog", "a dog jumping"), None);
        assert_eq!(
            conflict("a man filming something", "a man filming a building"),
            None
        );
    }

    #[test]
    fn mining_keeps_close_conflicting_captions_of_other_images_and_fill_places_them() {
        let set = PairSet {
            name: "t".into(),
            images: Vec::new(),
            image_ids: vec!["a".into(), "b".into(), "c".into(), "d".into()],
            captions: vec![
                "a black dog".into(),     // image 0
                "a dark dog".into(),      // image 0 (same image: never a negative)
                "a white dog".into(),     // image 1: close, conflicting colour
                "a black dog too".into(), // image 2: close, but no conflict
                "two cats".into(),        // image 3: far
            ],
            caption_image: vec![0, 0, 1, 2, 3],
            issues: Vec::new(),
        };
        let unit = |v: [f32; 2]| {
            let n = (v[0] * v[0] + v[1] * v[1]).sqrt();
            vec![v[0] / n, v[1] / n]
        };
        let emb = vec![
            unit([1.0, 0.0]),
            unit([1.0, 0.05]),
            unit([1.0, 0.3]),
            unit([1.0, 0.1]),
            unit([0.0, 1.0]),
        ];
        let anchors = MinedNegatives::mine(&set, &emb, 3, (0.5, 0.999), &crate::progress::Silent);
        let got: Vec<usize> = anchors[0].iter().map(|n| n.caption).collect();
        assert_eq!(got, vec![2], "{anchors:?}");
        assert!(anchors[4].is_empty());
        let m = MinedNegatives {
            dataset: "t".into(),
            model: "m".into(),
            top_k: 3,
            window: (0.5, 0.999),
            captions: set.captions.clone(),
            anchors,
        };
        let mut batch = vec![(0, 0), (2, 3), (3, 4)];
        m.fill(&set, &mut batch, 0.5);
        assert_eq!(batch, vec![(0, 0), (2, 3), (1, 2)]);
    }
}
