//! Multimodal retrieval-augmented answers (the seed's RAG): retrieve photos
//! from a clasp store (text→image, image→image, or both; optionally hybrid
//! with the captions' full-text index, fused by RRF), put them into a
//! vision-language model's prompt as numbered images with their paths and
//! captions, and generate an answer that cites them as `[n]`.
//!
//! The library retrieves and builds the conversation; generation is the
//! caller's (`ChatModel::conversation_prompt` and `llm::generate_prompt`, or the
//! server's engine).

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::index::query::{self, Term, TermKind};
use crate::index::{search, Store, VectorSearch};
use crate::preprocess::image::load_image;
use crate::vlm::{ChatModel, Part, Turn};
use crate::{Encoder, Error, Result};

/// A retrieved photo.
#[derive(Clone, Debug, Serialize)]
pub struct Source {
    /// Its number in the prompt (`[n]`), from 1.
    pub n: usize,
    pub path: String,
    pub score: f64,
    /// Its caption in the store (sidecar text, EXIF description or file
    /// name), when it has one.
    pub caption: String,
}

/// What to retrieve.
#[derive(Clone, Debug)]
pub struct RagQuery {
    pub question: String,
    /// A photo the question is about: it also queries the store
    /// (image→image) and goes into the prompt.
    pub image: Option<PathBuf>,
    pub k: usize,
    /// Fuse the vector hits with the captions' full-text hits (RRF).
    pub hybrid: bool,
}

/// Retrieves the `k` best photos for the question (and image), best first.
pub fn retrieve(
    encoder: &Encoder,
    catalog: &mut dyn Store,
    engine: &dyn VectorSearch,
    q: &RagQuery,
) -> Result<Vec<Source>> {
    if q.question.trim().is_empty() {
        return Err(Error::Report("the question is empty".into()));
    }
    let mut terms = vec![Term {
        weight: 1.0,
        kind: TermKind::Text(q.question.clone()),
    }];
    if let Some(p) = &q.image {
        terms.push(Term {
            weight: 1.0,
            kind: TermKind::Image(p.clone()),
        });
    }
    let v = query::embed(encoder, &terms)?;
    let hits = if q.hybrid {
        search::hybrid_search(engine, catalog, &v, &q.question, q.k, &[])?
    } else {
        search::vector_search(engine, catalog, &v, q.k, &[])?
    };
    hits.into_iter()
        .enumerate()
        .map(|(i, h)| {
            Ok(Source {
                n: i + 1,
                caption: catalog.caption_of(&h.path)?.unwrap_or_default(),
                path: h.path,
                score: h.score,
            })
        })
        .collect()
}

/// The numbered sources as prompt parts: `[n]`, the image, its path and
/// caption. Sources whose image cannot be read are left out and returned
/// with their error.
pub fn source_parts(vlm: &dyn ChatModel, sources: &[Source]) -> (Vec<Part>, Vec<(Source, Error)>) {
    let mut parts = vec![Part::Text(
        "Photos from the collection, numbered, with their captions:".into(),
    )];
    let mut skipped = Vec::new();
    for s in sources {
        if vlm.image_processor().is_none() {
            // A model that reads no images gets each photo's path and caption.
            parts.push(Part::Text(format!("[{}] {} {}", s.n, s.path, s.caption)));
            continue;
        }
        match load_image(Path::new(&s.path)).and_then(|img| vlm.prepare_image(&img)) {
            Ok(image) => {
                parts.push(Part::Text(format!("[{}]", s.n)));
                parts.push(image);
                let caption = if s.caption.is_empty() {
                    String::new()
                } else {
                    format!(" {}", s.caption)
                };
                parts.push(Part::Text(format!("{}{caption}", s.path)));
            }
            Err(e) => skipped.push((s.clone(), e)),
        }
    }
    (parts, skipped)
}

/// The instruction that closes a retrieval-augmented turn.
pub const CITE: &str = "Answer briefly, and cite the photos you used as [1], [2], ...";

/// The conversation for an answer: one user turn with the sources
/// ([`source_parts`]), the question's own photo if any, the question, and
/// the instruction to cite.
pub fn conversation(
    vlm: &dyn ChatModel,
    question: &str,
    image: Option<&Path>,
    sources: &[Source],
) -> Result<(Turn, Vec<(Source, Error)>)> {
    let (mut parts, skipped) = source_parts(vlm, sources);
    if let Some(p) = image {
        let img = load_image(p)?;
        parts.push(Part::Text("The question is about this photo:".into()));
        parts.push(vlm.prepare_image(&img)?);
    }
    parts.push(Part::Text(format!("Question: {question}\n{CITE}")));
    Ok((
        Turn {
            role: "user".into(),
            parts,
        },
        skipped,
    ))
}

/// The source numbers an answer cites (`[n]` for n in 1..=count), in
/// order of first mention.
pub fn cited(answer: &str, count: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut rest = answer;
    while let Some(i) = rest.find('[') {
        rest = &rest[i + 1..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if !digits.is_empty() && rest[digits.len()..].starts_with(']') {
            if let Ok(n) = digits.parse::<usize>() {
                if (1..=count).contains(&n) && !out.contains(&n) {
                    out.push(n);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn citations_are_read_in_order_and_bounded() {
        assert_eq!(cited("A dog [2] runs, as in [1] and [2].", 3), vec![2, 1]);
        assert_eq!(cited("See [4] or [0] or [x] or [1", 3), Vec::<usize>::new());
        assert_eq!(cited("[10] and [3]", 10), vec![10, 3]);
    }
}
