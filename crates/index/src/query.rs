//! rclip-style query algebra: `"a dog" + "on a beach" - "night"`, with
//! weights written `2:"snow"`. A term that names an existing image file is
//! an image query; anything else is text.

use std::path::{Path, PathBuf};

use crate::{Embedder, Error, Result};
use clasp_core::data::files::has_image_extension;

#[derive(Clone, Debug, PartialEq)]
pub enum TermKind {
    Text(String),
    Image(PathBuf),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Term {
    pub weight: f32,
    pub kind: TermKind,
}

fn strip_quotes(s: &str) -> &str {
    let s = s.trim();
    for q in ['"', '\''] {
        if s.len() >= 2 && s.starts_with(q) && s.ends_with(q) {
            return &s[1..s.len() - 1];
        }
    }
    s
}

fn term(raw: &str, sign: f32) -> Result<Term> {
    let raw = raw.trim();
    // `W:rest` where W parses as a number (a path like C:\ does not).
    let (weight, body) = match raw.split_once(':') {
        Some((w, rest)) if w.trim().parse::<f32>().is_ok() => {
            (w.trim().parse::<f32>().unwrap(), rest)
        }
        _ => (1.0, raw),
    };
    let body = strip_quotes(body);
    if body.is_empty() {
        return Err(Error::Report(format!("empty query term in `{raw}`")));
    }
    let p = Path::new(body);
    let kind = if has_image_extension(p) && p.is_file() {
        TermKind::Image(p.to_path_buf())
    } else {
        if has_image_extension(p) {
            tracing::warn!(
                "`{body}` looks like an image path, but there is no such file; searching it as text"
            );
        }
        TermKind::Text(body.to_string())
    };
    Ok(Term {
        weight: sign * weight,
        kind,
    })
}

/// Parses query arguments. `+` and `-` are operators when they stand alone
/// as arguments or are surrounded by spaces inside one argument.
pub fn parse(args: &[String]) -> Result<Vec<Term>> {
    let joined = args
        .iter()
        .map(|a| {
            if a == "+" || a == "-" {
                a.clone()
            } else if a.contains(' ') && !a.starts_with('"') {
                format!("\"{a}\"")
            } else {
                a.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ");
    parse_expr(&joined)
}

/// Parses one query expression, e.g. `"a dog" + 2:"snow" - night` (what the
/// server receives as `query`): quoted texts, `+`/`-` between terms,
/// `W:` weights.
pub fn parse_expr(joined: &str) -> Result<Vec<Term>> {
    let mut terms = Vec::new();
    let mut sign = 1.0;
    let mut cur = String::new();
    let mut in_quotes = false;
    // The last operator, until a term follows it.
    let mut dangling: Option<char> = None;
    let chars: Vec<char> = joined.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' {
            in_quotes = !in_quotes;
            cur.push(c);
        } else if !in_quotes
            && (c == '+' || c == '-')
            && (i == 0 || chars[i - 1] == ' ')
            && (i + 1 == chars.len() || chars[i + 1] == ' ')
        {
            if !cur.trim().is_empty() {
                terms.push(term(&cur, sign)?);
            } else if !terms.is_empty() || c == '+' {
                // `a + + b` or a leading `+`: keep going
            }
            cur.clear();
            sign = if c == '-' { -1.0 } else { 1.0 };
            dangling = Some(c);
        } else {
            cur.push(c);
            if !c.is_whitespace() {
                dangling = None;
            }
        }
        i += 1;
    }
    if !cur.trim().is_empty() {
        terms.push(term(&cur, sign)?);
    }
    if let (Some(op), false) = (dangling, terms.is_empty()) {
        return Err(Error::Report(format!(
            "the query ends with `{op}`: put a term after it, or remove it"
        )));
    }
    if terms.is_empty() {
        return Err(Error::Report(
            "empty query: give a text, an image path, or terms joined by + and -".into(),
        ));
    }
    Ok(terms)
}

/// The query vector: the weighted sum of the terms' unit embeddings,
/// normalised.
pub fn embed(encoder: &dyn Embedder, terms: &[Term]) -> Result<Vec<f32>> {
    let mut parts = Vec::with_capacity(terms.len());
    for t in terms {
        let v: Vec<f32> = match &t.kind {
            TermKind::Text(s) => encoder.embed_text(s)?,
            TermKind::Image(p) => encoder.embed_query_image(p)?,
        };
        parts.push((t.weight, v));
    }
    combine(encoder.query_dim(), parts)
}

/// The query vector from (weight, unit embedding) terms: their weighted sum,
/// normalised. The one implementation for the CLI and the server.
///
/// An error when a weight is not finite, or when the terms cancel out: a sum
/// shorter than 1e-4 of the total weight is rounding noise (the same text
/// embedded in two batches differs in the last bits), not a direction.
pub fn combine(dim: usize, terms: Vec<(f32, Vec<f32>)>) -> Result<Vec<f32>> {
    let mut acc = vec![0f32; dim];
    let mut total = 0f32;
    for (w, v) in terms {
        if !w.is_finite() {
            return Err(Error::Report(format!(
                "query weight {w} is not a finite number"
            )));
        }
        if v.len() != dim {
            return Err(Error::Shape(format!(
                "a query term of {} dimensions against a model of {dim}",
                v.len()
            )));
        }
        total += w.abs();
        for (a, x) in acc.iter_mut().zip(v) {
            *a += w * x;
        }
    }
    let n = acc.iter().map(|x| x * x).sum::<f32>().sqrt();
    if !n.is_finite() {
        return Err(Error::Report("the query weights are too large".into()));
    }
    if n <= 1e-4 * total || n == 0.0 {
        return Err(Error::Report("the query terms cancel out".into()));
    }
    Ok(acc.iter().map(|x| x / n).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combine_normalises_and_refuses_what_is_not_a_direction() {
        let e = |v: &[f32]| v.to_vec();
        let q = combine(2, vec![(2.0, e(&[1.0, 0.0])), (1.0, e(&[0.0, 1.0]))]).unwrap();
        let n = 5f32.sqrt();
        assert!((q[0] - 2.0 / n).abs() < 1e-6 && (q[1] - 1.0 / n).abs() < 1e-6);
        // Exact and near cancellation (rounding noise) both cancel out.
        let noisy = e(&[1.0, 1e-7]);
        for terms in [
            vec![(-1.0, e(&[1.0, 0.0])), (1.0, e(&[1.0, 0.0]))],
            vec![(-1.0, e(&[1.0, 0.0])), (1.0, noisy)],
        ] {
            let err = combine(2, terms).unwrap_err().to_string();
            assert!(err.contains("cancel out"), "{err}");
        }
        for w in [f32::NAN, f32::INFINITY] {
            let err = combine(2, vec![(w, e(&[1.0, 0.0]))])
                .unwrap_err()
                .to_string();
            assert!(err.contains("not a finite number"), "{err}");
        }
        let err = combine(2, vec![(1e38, e(&[1.0, 1.0])), (1e38, e(&[1.0, 1.0]))])
            .unwrap_err()
            .to_string();
        assert!(err.contains("too large"), "{err}");
    }

    fn texts(args: &[&str]) -> Vec<(f32, String)> {
        parse(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap()
            .into_iter()
            .map(|t| match t.kind {
                TermKind::Text(s) => (t.weight, s),
                TermKind::Image(p) => (t.weight, p.display().to_string()),
            })
            .collect()
    }

    #[test]
    fn algebra() {
        assert_eq!(
            texts(&["a dog", "+", "on a beach", "-", "night"]),
            vec![
                (1.0, "a dog".into()),
                (1.0, "on a beach".into()),
                (-1.0, "night".into())
            ]
        );
        assert_eq!(
            texts(&[r#""a dog" + 2:"snow" - 0.5:night"#]),
            vec![
                (1.0, "a dog".into()),
                (2.0, "snow".into()),
                (-0.5, "night".into())
            ]
        );
        assert_eq!(
            texts(&["black-and-white dog"]),
            vec![(1.0, "black-and-white dog".into())]
        );
        assert_eq!(texts(&["a", "dog"]), vec![(1.0, "a dog".into())]);
        assert!(parse(&["+".to_string()]).is_err());
        for dangling in [&["a dog", "+"][..], &["a dog", "-"], &[r#""a dog" + "#]] {
            let err = parse(&dangling.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap_err()
                .to_string();
            assert!(err.contains("ends with"), "{dangling:?}: {err}");
        }
        // A quoted `+` is text, not an operator.
        assert_eq!(texts(&[r#""a + b""#]), vec![(1.0, "a + b".into())]);
    }
}
