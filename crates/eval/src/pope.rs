//! POPE (Li et al. 2023, "Evaluating Object Hallucination in Large
//! Vision-Language Models"): yes/no questions "Is there a X in the image?"
//! about objects an image holds and objects it does not, built and scored as
//! the paper's code (`AoiDragon/POPE`, utils.py and evaluate.py) does.
//!
//! Every image with at least `per_image` objects is polled: its first
//! `per_image` objects (in the order given) are asked with the answer yes,
//! and after each, one absent object with the answer no, chosen
//! - **random**: uniformly among the objects of the whole set;
//! - **popular**: the most frequent object of the set (by images holding it)
//!   not yet asked and not in the image;
//! - **adversarial**: the object that co-occurs most often with that
//!   positive, not yet asked and not in the image (random when none is left).
//!
//! Ties in frequency keep the order in which objects were first met, as
//! Python's stable sort over an insertion-ordered dict does. One departure:
//! the paper makes "an" with `template.replace("a", "an")`, which also turns
//! "image" into "imange"; the questions here say "an ... image".
//!
//! An answer is "no" when its first sentence (up to the first '.', commas
//! removed, split on spaces) has the word "No", "no" or "not"; otherwise yes.

use std::collections::HashMap;

use serde::Serialize;

use clasp_common::rng::Rng;

/// How absent objects are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Negatives {
    Random,
    Popular,
    Adversarial,
}

impl Negatives {
    pub const ALL: [Negatives; 3] = [
        Negatives::Random,
        Negatives::Popular,
        Negatives::Adversarial,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Negatives::Random => "random",
            Negatives::Popular => "popular",
            Negatives::Adversarial => "adversarial",
        }
    }
}

/// One question: image index, object, and whether the image holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Question {
    pub image: usize,
    pub object: String,
    pub present: bool,
}

impl Question {
    /// The question as asked.
    pub fn text(&self) -> String {
        let article = match self.object.chars().next() {
            Some('a' | 'e' | 'i' | 'o' | 'u') => "an",
            _ => "a",
        };
        format!("Is there {article} {} in the image?", self.object)
    }
}

/// Objects in order of first appearance with how many images hold each, and
/// for each object the others ranked by how often they share an image.
struct Stats {
    by_frequency: Vec<String>,
    co_occurring: HashMap<String, Vec<String>>,
    seen: Vec<String>,
}

fn stats(images: &[&[String]]) -> Stats {
    let mut count: Vec<(String, usize)> = Vec::new();
    let mut co: Vec<(String, Vec<(String, usize)>)> = Vec::new();
    let bump = |v: &mut Vec<(String, usize)>, k: &str| match v.iter_mut().find(|(o, _)| o == k) {
        Some((_, n)) => *n += 1,
        None => v.push((k.to_string(), 1)),
    };
    for objects in images {
        for o in objects.iter() {
            bump(&mut count, o);
            let pos = match co.iter().position(|(k, _)| k == o) {
                Some(p) => p,
                None => {
                    co.push((o.clone(), Vec::new()));
                    co.len() - 1
                }
            };
            for other in objects.iter().filter(|x| *x != o) {
                bump(&mut co[pos].1, other);
            }
        }
    }
    let seen: Vec<String> = count.iter().map(|(o, _)| o.clone()).collect();
    // Stable: ties keep first-met order.
    count.sort_by_key(|x| std::cmp::Reverse(x.1));
    let co_occurring = co
        .into_iter()
        .map(|(o, mut v)| {
            v.sort_by_key(|x| std::cmp::Reverse(x.1));
            (o, v.into_iter().map(|(x, _)| x).collect())
        })
        .collect();
    Stats {
        by_frequency: count.into_iter().map(|(o, _)| o).collect(),
        co_occurring,
        seen,
    }
}

/// The questions for `images[i]`'s objects (ordered, without repeats);
/// images with fewer than `per_image` objects are skipped. `rng` draws the
/// random negatives (and the fallbacks of the other two).
pub fn questions(
    images: &[&[String]],
    per_image: usize,
    negatives: Negatives,
    rng: &mut Rng,
) -> Vec<Question> {
    let eligible: Vec<(usize, &[String])> = images
        .iter()
        .enumerate()
        .filter(|(_, o)| o.len() >= per_image)
        .map(|(i, o)| (i, *o))
        .collect();
    let st = stats(&eligible.iter().map(|(_, o)| *o).collect::<Vec<_>>());
    let mut out = Vec::new();
    for (image, objects) in eligible {
        let mut asked: Vec<&str> = Vec::new();
        let free = |o: &str, asked: &[&str]| !asked.contains(&o) && !objects.iter().any(|x| x == o);
        for pos in &objects[..per_image] {
            asked.push(pos);
            out.push(Question {
                image,
                object: pos.clone(),
                present: true,
            });
            let ranked: &[String] = match negatives {
                Negatives::Random => &[],
                Negatives::Popular => &st.by_frequency,
                Negatives::Adversarial => st.co_occurring.get(pos).map_or(&[], Vec::as_slice),
            };
            let chosen = match ranked.iter().find(|o| free(o, &asked)) {
                Some(o) => Some(o.as_str()),
                // Random draws from every object of the set, as the paper's
                // `random.choice` does; none may be free in a tiny set.
                None if st.seen.iter().any(|o| free(o, &asked)) => loop {
                    let o = st.seen[rng.below(st.seen.len())].as_str();
                    if free(o, &asked) {
                        break Some(o);
                    }
                },
                None => None,
            };
            if let Some(neg) = chosen {
                asked.push(neg);
                out.push(Question {
                    image,
                    object: neg.to_string(),
                    present: false,
                });
            }
        }
    }
    out
}

/// POPE's reading of an answer: true for yes.
pub fn says_yes(answer: &str) -> bool {
    let first = answer.split('.').next().unwrap_or("").replace(',', "");
    !first.split(' ').any(|w| matches!(w, "No" | "no" | "not"))
}

/// POPE's scores, "yes" the positive class.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PopeScores {
    pub questions: usize,
    pub accuracy: f64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub yes_ratio: f64,
    pub tp: usize,
    pub fp: usize,
    pub tn: usize,
    pub fn_: usize,
}

/// Scores answers (true: yes) against labels (true: present). Ratios with a
/// zero denominator are 0.
pub fn score(answers: &[bool], labels: &[bool]) -> PopeScores {
    let (mut tp, mut fp, mut tn, mut fn_) = (0, 0, 0, 0);
    for (&a, &l) in answers.iter().zip(labels) {
        match (a, l) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, false) => tn += 1,
            (false, true) => fn_ += 1,
        }
    }
    let r = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let (precision, recall) = (r(tp, tp + fp), r(tp, tp + fn_));
    let f1 = if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    };
    let n = answers.len().min(labels.len());
    PopeScores {
        questions: n,
        accuracy: r(tp + tn, n),
        precision,
        recall,
        f1,
        yes_ratio: r(tp + fp, n),
        tp,
        fp,
        tn,
        fn_,
    }
}

/// How the model answers: by generating (POPE's way, the answer read for a
/// "no"), or by comparing the next-token logits of "Yes" and "No" after the
/// question (a model never taught to answer yes/no still has a preference).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AnswerBy {
    Generate,
    Logits,
}

/// One asked question and the model's answer.
#[derive(Debug, Clone, Serialize)]
pub struct Answered {
    pub image: String,
    pub object: String,
    pub present: bool,
    pub answer: String,
    pub yes: bool,
}

/// POPE of one negative-sampling mode.
#[derive(Debug, Clone, Serialize)]
pub struct PopeRun {
    pub negatives: Negatives,
    pub scores: PopeScores,
    pub answers: Vec<Answered>,
}

/// POPE of a vision-language model over every mode asked.
#[derive(Debug, Clone, Serialize)]
pub struct PopeEval {
    pub images: usize,
    pub runs: Vec<PopeRun>,
    /// Images that could not be read, with the error (their questions dropped).
    pub failed: Vec<(String, String)>,
}

/// Asks `vlm` POPE's questions about `images` (with `objects[i]` the objects
/// of image i, ordered) for each mode in `modes`, greedy. Each image is read
/// once and every distinct question about it is answered in one batch; the
/// random draws are seeded with `seed`.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_pope(
    vlm: &crate::vlm::Vlm,
    images: &[crate::data::ImageSource],
    objects: &[Vec<String>],
    modes: &[Negatives],
    per_image: usize,
    seed: u64,
    opts: &crate::llm::GenerateOptions,
    by: AnswerBy,
    progress: &dyn crate::progress::Progress,
) -> crate::Result<PopeEval> {
    // "Yes" and "No" as the answer's first token.
    let first = |w: &str| -> crate::Result<u32> {
        vlm.tokenizer
            .encode(w, false)?
            .first()
            .copied()
            .ok_or_else(|| crate::Error::Report(format!("the tokenizer gives no token for {w:?}")))
    };
    let yes_no = (first("Yes")?, first("No")?);
    use crate::preprocess::image::decode_image;
    use std::collections::{BTreeMap, BTreeSet};
    let refs: Vec<&[String]> = objects.iter().map(|o| &o[..]).collect();
    let mut rng = Rng(seed);
    let asked: Vec<(Negatives, Vec<Question>)> = modes
        .iter()
        .map(|&m| (m, questions(&refs, per_image, m, &mut rng)))
        .collect();
    let mut by_image: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
    for q in asked.iter().flat_map(|(_, qs)| qs) {
        by_image
            .entry(q.image)
            .or_default()
            .insert(q.object.clone());
    }
    let mut answers: HashMap<(usize, String), String> = HashMap::new();
    let mut failed = Vec::new();
    progress.start("asking", by_image.len() as u64);
    for (&i, objs) in &by_image {
        let src = &images[i];
        let read = src
            .read()
            .and_then(|bytes| decode_image(&bytes, &src.path()))
            .and_then(|img| vlm.image_processor().process(&img));
        let pixels = match read.and_then(|px| vlm.pixel_batch(&[px])) {
            Ok(p) => p,
            Err(e) => {
                failed.push((src.display_name(), e.to_string()));
                progress.inc(1);
                continue;
            }
        };
        let objs: Vec<&String> = objs.iter().collect();
        let users: Vec<String> = objs
            .iter()
            .map(|o| {
                let q = Question {
                    image: i,
                    object: o.to_string(),
                    present: false,
                };
                crate::vlm::Vlm::caption_turn(&q.text())
            })
            .collect();
        match by {
            AnswerBy::Generate => {
                for (o, g) in objs.iter().zip(vlm.answer_each(&pixels, &users, opts)?) {
                    answers.insert((i, o.to_string()), g.text.trim().to_string());
                }
            }
            AnswerBy::Logits => {
                let feats = vlm.image_features(&pixels)?;
                for (o, u) in objs.iter().zip(&users) {
                    let ids = vlm.chat_prompt(u, 1)?;
                    let logits = vlm.logits_of_features(&ids, &feats)?;
                    let last: Vec<f32> = logits.get(ids.len() - 1)?.to_vec1()?;
                    let yes = last[yes_no.0 as usize] > last[yes_no.1 as usize];
                    answers.insert((i, o.to_string()), if yes { "Yes" } else { "No" }.into());
                }
            }
        }
        progress.inc(1);
    }
    progress.finish();
    let runs = asked
        .into_iter()
        .map(|(negatives, qs)| {
            let answered: Vec<Answered> = qs
                .into_iter()
                .filter_map(|q| {
                    let answer = answers.get(&(q.image, q.object.clone()))?.clone();
                    Some(Answered {
                        image: images[q.image].display_name(),
                        yes: says_yes(&answer),
                        object: q.object,
                        present: q.present,
                        answer,
                    })
                })
                .collect();
            let yes: Vec<bool> = answered.iter().map(|a| a.yes).collect();
            let labels: Vec<bool> = answered.iter().map(|a| a.present).collect();
            PopeRun {
                negatives,
                scores: score(&yes, &labels),
                answers: answered,
            }
        })
        .collect();
    Ok(PopeEval {
        images: by_image.len() - failed.len(),
        runs,
        failed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn answers_read_as_the_paper_reads_them() {
        assert!(says_yes("Yes, there is a dog."));
        assert!(!says_yes("No, there is no dog."));
        assert!(!says_yes("There is not a dog in the image"));
        assert!(says_yes("Nope. no"));
        assert!(says_yes("NO"));
        assert!(!says_yes("no."));
    }

    #[test]
    fn popular_and_adversarial_negatives() {
        let imgs = [
            s(&["dog", "person", "frisbee"]),
            s(&["person", "car", "bus"]),
            s(&["dog", "car", "person"]),
        ];
        let refs: Vec<&[String]> = imgs.iter().map(|v| &v[..]).collect();
        let mut rng = Rng(0);
        let q = questions(&refs, 3, Negatives::Popular, &mut rng);
        // person 3 images, dog 2, car 2 (dog met first), frisbee 1, bus 1;
        // image 0's third positive has no absent object left to ask.
        let negs: Vec<&str> = q
            .iter()
            .filter(|q| !q.present)
            .map(|q| q.object.as_str())
            .collect();
        assert_eq!(negs[..3], ["car", "bus", "dog"]);
        let q = questions(&refs, 3, Negatives::Adversarial, &mut rng);
        let img1: Vec<(&str, bool)> = q
            .iter()
            .filter(|q| q.image == 1)
            .map(|q| (q.object.as_str(), q.present))
            .collect();
        // person co-occurs with dog twice; car with dog, then frisbee is all that is left.
        assert_eq!(
            img1[..4],
            [
                ("person", true),
                ("dog", false),
                ("car", true),
                ("frisbee", false)
            ]
        );
        assert_eq!(q.len(), 15);
    }

    #[test]
    fn scores() {
        let s = score(
            &[true, true, false, false, true],
            &[true, false, false, true, true],
        );
        assert_eq!((s.tp, s.fp, s.tn, s.fn_), (2, 1, 1, 1));
        assert!((s.f1 - 2.0 / 3.0).abs() < 1e-12 && (s.yes_ratio - 0.6).abs() < 1e-12);
    }
}
