//! Captioning metrics as the COCO caption evaluation code (pycocoevalcap)
//! computes them: BLEU-1..4, ROUGE-L and CIDEr-D, over captions tokenized
//! the way its PTB tokenizer does.
//!
//! - **Tokenizing.** pycocoevalcap runs Stanford's PTBTokenizer
//!   (`-lowerCase -preserveLines`) and drops punctuation tokens. [`ptb_tokenize`]
//!   follows the rules of that tokenizer that captions meet: lower case,
//!   punctuation split off words, contractions split (`is n't`, `dog 's`,
//!   `ca n't`, `can not`, `gon na`), brackets written `-lrb-` and kept
//!   (pycocoevalcap's punctuation list has them in upper case only), `$ 5.50`,
//!   `100 %`, abbreviations such as `mr.` and `u.s.` kept whole. Chinese has no
//!   PTB rules: [`char_tokenize`] scores it on characters (ASCII words stay
//!   whole, punctuation is dropped).
//! - **BLEU** is corpus-level with the reference length "closest" to each
//!   candidate (ties to the shorter), as `Bleu(4).compute_score` does.
//! - **ROUGE-L** takes the best LCS precision and recall over the references
//!   and combines them with beta 1.2; the corpus value is the mean.
//! - **CIDEr-D** is pycocoevalcap's `Cider`: tf-idf over 1..4-grams with
//!   document frequencies from the references of the evaluated set, clipped
//!   candidate counts, a Gaussian length penalty (sigma 6), times 10. Like the
//!   reference, its "length" is the number of bigrams.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

/// The tokens pycocoevalcap removes after tokenizing.
const PUNCTUATION: &[&str] = &[
    "''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
    "...", ";",
];

/// Words whose final period belongs to them.
const ABBREVIATIONS: &[&str] = &[
    "mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "vs", "etc", "inc", "co", "ltd", "mt", "ft",
    "no", "jan", "feb", "mar", "apr", "aug", "sep", "sept", "oct", "nov", "dec", "gen", "col",
    "capt", "lt", "sgt", "rev", "ave", "blvd",
];

/// Tokenizes an English caption as pycocoevalcap's PTB tokenizer does and
/// drops punctuation tokens; tokens joined by single spaces.
pub fn ptb_tokenize(text: &str) -> String {
    let lower = text.to_lowercase();
    let mut out: Vec<String> = Vec::new();
    for chunk in lower.split_whitespace() {
        split_chunk(chunk, &mut out);
    }
    out.retain(|t| !PUNCTUATION.contains(&t.as_str()));
    out.join(" ")
}

fn bracket(c: char) -> Option<&'static str> {
    Some(match c {
        '(' => "-lrb-",
        ')' => "-rrb-",
        '[' => "-lsb-",
        ']' => "-rsb-",
        '{' => "-lcb-",
        '}' => "-rcb-",
        _ => return None,
    })
}

/// Splits one whitespace-free chunk into PTB tokens.
fn split_chunk(chunk: &str, out: &mut Vec<String>) {
    let mut s: &str = chunk;
    // Leading quotes and brackets.
    let mut lead = Vec::new();
    while let Some(c) = s.chars().next() {
        if let Some(b) = bracket(c).filter(|_| "([{".contains(c)) {
            lead.push(b.to_string());
        } else if c == '"' {
            lead.push("``".into());
        } else if (c == '\'' || c == '`') && !is_contraction_start(s) {
            lead.push("`".into());
        } else if (c == '$' || c == '#') && s.len() > 1 {
            lead.push(c.to_string());
        } else {
            break;
        }
        s = &s[c.len_utf8()..];
    }
    // Trailing punctuation, collected from the end.
    let mut trail: Vec<String> = Vec::new();
    loop {
        if s.is_empty() {
            break;
        }
        if let Some(rest) = s.strip_suffix("...") {
            trail.push("...".into());
            s = rest;
            continue;
        }
        let c = s.chars().next_back().unwrap_or(' ');
        let rest = &s[..s.len() - c.len_utf8()];
        if "!?".contains(c) {
            let run = s.len() - s.trim_end_matches(['!', '?']).len();
            trail.push(s[s.len() - run..].to_string());
            s = &s[..s.len() - run];
            continue;
        }
        if let Some(b) = bracket(c).filter(|_| ")]}".contains(c)) {
            trail.push(b.into());
        } else if c == '"' {
            trail.push("''".into());
        } else if (c == '\'' && !rest.ends_with('n')) || c == '`' {
            trail.push("'".into());
        } else if ",;:".contains(c) {
            trail.push(c.to_string());
        } else if c == '.' && !keeps_period(s) {
            trail.push(".".into());
        } else if (c == '%' || c == '$') && !rest.is_empty() {
            trail.push(c.to_string());
        } else {
            break;
        }
        s = rest;
    }
    out.extend(lead);
    split_word(s, out);
    out.extend(trail.into_iter().rev());
}

fn is_contraction_start(s: &str) -> bool {
    ["'s", "'ll", "'re", "'ve", "'m", "'d", "'n'"]
        .iter()
        .any(|c| s == *c || (s.starts_with(c) && *c == "'n'"))
}

/// Whether the final period of `s` belongs to the word (an abbreviation, or
/// letters joined by periods such as `u.s.` and `p.m.`).
fn keeps_period(s: &str) -> bool {
    let body = &s[..s.len() - 1];
    if body.is_empty() {
        return false;
    }
    if ABBREVIATIONS.contains(&body) {
        return true;
    }
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() > 2
        && parts[..parts.len() - 1]
            .iter()
            .all(|p| p.chars().count() == 1 && p.chars().all(char::is_alphabetic))
}

/// Splits contractions, operators and dashes inside a word.
fn split_word(w: &str, out: &mut Vec<String>) {
    if w.is_empty() {
        return;
    }
    if let Some((a, b)) = w.split_once("--") {
        split_word(a, out);
        out.push("--".into());
        split_word(b, out);
        return;
    }
    for op in ['+', '='] {
        if let Some((a, b)) = w.split_once(op) {
            split_word(a, out);
            out.push(op.to_string());
            split_word(b, out);
            return;
        }
    }
    if let Some((a, b)) = w.split_once("'n'") {
        split_word(a, out);
        out.push("'n'".into());
        split_word(b, out);
        return;
    }
    for (whole, first, second) in [
        ("cannot", "can", "not"),
        ("gonna", "gon", "na"),
        ("gotta", "got", "ta"),
        ("wanna", "wan", "na"),
        ("gimme", "gim", "me"),
        ("lemme", "lem", "me"),
    ] {
        if w == whole {
            out.push(first.into());
            out.push(second.into());
            return;
        }
    }
    if let Some(stem) = w.strip_suffix("n't").filter(|s| !s.is_empty()) {
        out.push(stem.into());
        out.push("n't".into());
        return;
    }
    for suffix in ["'s", "'ll", "'re", "'ve", "'m", "'d"] {
        if let Some(stem) = w.strip_suffix(suffix).filter(|s| !s.is_empty()) {
            out.push(stem.into());
            out.push(suffix.into());
            return;
        }
    }
    out.push(w.into());
}

/// Tokenizes Chinese (or any text without spaces) into characters: each
/// CJK character is a token, runs of ASCII letters and digits stay one
/// token, whitespace and punctuation are dropped.
pub fn char_tokenize(text: &str) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut word = String::new();
    for c in text.chars() {
        if c.is_ascii_alphanumeric() {
            word.extend(c.to_lowercase());
            continue;
        }
        if !word.is_empty() {
            out.push(std::mem::take(&mut word));
        }
        if c.is_alphanumeric() {
            out.push(c.to_string());
        }
    }
    if !word.is_empty() {
        out.push(word);
    }
    out.join(" ")
}

/// Corpus and per-image caption scores.
#[derive(Debug, Clone, Serialize)]
pub struct CaptionScores {
    /// BLEU-1..4.
    pub bleu: [f64; 4],
    pub rouge_l: f64,
    pub cider_d: f64,
    /// Per image: BLEU-1..4, ROUGE-L and CIDEr-D.
    pub per_image: Vec<ImageScores>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ImageScores {
    pub bleu: [f64; 4],
    pub rouge_l: f64,
    pub cider_d: f64,
}

/// N-gram counts, ordered: every sum over them runs in one order, so a
/// score is the same bits in every process (a `HashMap`'s order is drawn
/// per process).
type Counts<'a> = BTreeMap<&'a [&'a str], f64>;

fn ngrams<'a>(words: &'a [&'a str], n: usize) -> Counts<'a> {
    let mut c = BTreeMap::new();
    for k in 1..=n {
        for w in words.windows(k) {
            *c.entry(w).or_insert(0.0) += 1.0;
        }
    }
    c
}

/// Scores tokenized candidates (one per image) against tokenized references.
/// Panics if the lengths differ or an image has no references.
pub fn score(cands: &[String], refs: &[Vec<String>]) -> CaptionScores {
    assert_eq!(cands.len(), refs.len(), "one candidate per image");
    assert!(
        refs.iter().all(|r| !r.is_empty()),
        "every image needs a reference"
    );
    let cand_words: Vec<Vec<&str>> = cands
        .iter()
        .map(|c| c.split_whitespace().collect())
        .collect();
    let ref_words: Vec<Vec<Vec<&str>>> = refs
        .iter()
        .map(|rs| rs.iter().map(|r| r.split_whitespace().collect()).collect())
        .collect();
    let (bleu, bleu_per) = bleu(&cand_words, &ref_words);
    let rouge_per: Vec<f64> = cands
        .iter()
        .zip(refs)
        .map(|(c, rs)| rouge_l(c, rs))
        .collect();
    let cider_per = cider_d(&cand_words, &ref_words);
    let n = cands.len().max(1) as f64;
    CaptionScores {
        bleu,
        rouge_l: rouge_per.iter().sum::<f64>() / n,
        cider_d: cider_per.iter().sum::<f64>() / n,
        per_image: (0..cands.len())
            .map(|i| ImageScores {
                bleu: bleu_per[i],
                rouge_l: rouge_per[i],
                cider_d: cider_per[i],
            })
            .collect(),
    }
}

fn bleu(cands: &[Vec<&str>], refs: &[Vec<Vec<&str>>]) -> ([f64; 4], Vec<[f64; 4]>) {
    let mut guess = [0f64; 4];
    let mut correct = [0f64; 4];
    let (mut testlen_all, mut reflen_all) = (0f64, 0f64);
    let mut per = Vec::with_capacity(cands.len());
    for (c, rs) in cands.iter().zip(refs) {
        let mut maxcounts: Counts = BTreeMap::new();
        for r in rs {
            for (g, k) in ngrams(r, 4) {
                let e = maxcounts.entry(g).or_insert(0.0);
                *e = e.max(k);
            }
        }
        let testlen = c.len() as f64;
        // The closest reference length; ties go to the shorter.
        let reflen = rs
            .iter()
            .map(|r| r.len() as f64)
            .min_by(|a, b| {
                (a - testlen)
                    .abs()
                    .total_cmp(&(b - testlen).abs())
                    .then(a.total_cmp(b))
            })
            .unwrap_or(0.0);
        let mut g = [0f64; 4];
        let mut k = [0f64; 4];
        for (n, g) in g.iter_mut().enumerate() {
            *g = (testlen - n as f64).max(0.0);
        }
        for (gram, cnt) in ngrams(c, 4) {
            k[gram.len() - 1] += cnt.min(*maxcounts.get(gram).unwrap_or(&0.0));
        }
        per.push(bleu_from(&k, &g, testlen, reflen));
        for n in 0..4 {
            guess[n] += g[n];
            correct[n] += k[n];
        }
        testlen_all += testlen;
        reflen_all += reflen;
    }
    (bleu_from(&correct, &guess, testlen_all, reflen_all), per)
}

/// BLEU-1..4 from clipped n-gram matches and n-gram counts: the running
/// geometric mean of the precisions, then the brevity penalty, with
/// pycocoevalcap's guards against zero counts.
fn bleu_from(correct: &[f64; 4], guess: &[f64; 4], testlen: f64, reflen: f64) -> [f64; 4] {
    const SMALL: f64 = 1e-9;
    const TINY: f64 = 1e-15;
    let mut b = [0f64; 4];
    let mut prod = 1.0;
    for n in 0..4 {
        prod *= (correct[n] + TINY) / (guess[n] + SMALL);
        b[n] = prod.powf(1.0 / (n + 1) as f64);
    }
    let ratio = (testlen + TINY) / (reflen + SMALL);
    if ratio < 1.0 {
        for x in b.iter_mut() {
            *x *= (1.0 - 1.0 / ratio).exp();
        }
    }
    b
}

fn lcs(a: &[&str], b: &[&str]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    for x in a {
        let mut cur = vec![0usize; b.len() + 1];
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y {
                prev[j] + 1
            } else {
                prev[j + 1].max(cur[j])
            };
        }
        prev = cur;
    }
    prev[b.len()]
}

/// ROUGE-L of one candidate; tokens split on single spaces, as the reference does.
fn rouge_l(cand: &str, refs: &[String]) -> f64 {
    const BETA: f64 = 1.2;
    let c: Vec<&str> = cand.split(' ').collect();
    let (mut p, mut r) = (0f64, 0f64);
    for reference in refs {
        let t: Vec<&str> = reference.split(' ').collect();
        let l = lcs(&t, &c) as f64;
        p = p.max(l / c.len() as f64);
        r = r.max(l / t.len() as f64);
    }
    if p != 0.0 && r != 0.0 {
        ((1.0 + BETA * BETA) * p * r) / (r + BETA * BETA * p)
    } else {
        0.0
    }
}

fn cider_d(cands: &[Vec<&str>], refs: &[Vec<Vec<&str>>]) -> Vec<f64> {
    const SIGMA: f64 = 6.0;
    let mut df: HashMap<&[&str], f64> = HashMap::new();
    for rs in refs {
        let mut seen: std::collections::HashSet<&[&str]> = std::collections::HashSet::new();
        for r in rs {
            seen.extend(ngrams(r, 4).into_keys());
        }
        for g in seen {
            *df.entry(g).or_insert(0.0) += 1.0;
        }
    }
    let ref_len = (refs.len() as f64).ln();
    cands
        .iter()
        .zip(refs)
        .map(|(c, rs)| {
            let vc_owned = tfidf(c, &df, ref_len);
            let (vc, nc, lc) = (&vc_owned.0, vc_owned.1, vc_owned.2);
            let mut score = [0f64; 4];
            for r in rs {
                let (vr, nr, lr) = tfidf(r, &df, ref_len);
                let delta = lc - lr;
                for n in 0..4 {
                    let mut val = 0.0;
                    for (g, h) in vc[n].iter() {
                        let rv = vr[n].get(g).copied().unwrap_or(0.0);
                        val += h.min(rv) * rv;
                    }
                    if nc[n] != 0.0 && nr[n] != 0.0 {
                        val /= nc[n] * nr[n];
                    }
                    val *= (-(delta * delta) / (2.0 * SIGMA * SIGMA)).exp();
                    score[n] += val;
                }
            }
            score.iter().sum::<f64>() / 4.0 / rs.len() as f64 * 10.0
        })
        .collect()
}

/// A caption's tf-idf vectors per n-gram order, their norms, and the
/// "length" pycocoevalcap uses (its count of bigrams).
type TfIdf<'a> = ([Counts<'a>; 4], [f64; 4], f64);

fn tfidf<'a>(words: &'a [&'a str], df: &HashMap<&[&str], f64>, ref_len: f64) -> TfIdf<'a> {
    let mut vec: [Counts; 4] = Default::default();
    let mut norm = [0f64; 4];
    let mut length = 0.0;
    for (g, tf) in ngrams(words, 4) {
        let d = df.get(g).copied().unwrap_or(0.0).max(1.0).ln();
        let n = g.len() - 1;
        let v = tf * (ref_len - d);
        norm[n] += v * v;
        vec[n].insert(g, v);
        if n == 1 {
            length += tf;
        }
    }
    (vec, norm.map(f64::sqrt), length)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chinese_is_scored_on_characters() {
        assert_eq!(
            char_tokenize("一只狗在草地上奔跑。"),
            "一 只 狗 在 草 地 上 奔 跑"
        );
        assert_eq!(
            char_tokenize("两个人在玩 iPhone 15！"),
            "两 个 人 在 玩 iphone 15"
        );
    }

    #[test]
    fn identical_captions_score_full_bleu_and_rouge() {
        let c = vec!["a dog runs on the grass".to_string()];
        let r = vec![vec!["a dog runs on the grass".to_string()]];
        let s = score(&c, &r);
        for b in s.bleu {
            assert!((b - 1.0).abs() < 1e-6, "{b}");
        }
        assert!((s.rouge_l - 1.0).abs() < 1e-12);
    }
}
