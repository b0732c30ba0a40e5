//! SigLIP parity with transformers on fixtures it produced
//! (scripts/gen_siglip_fixtures.py): SiglipTokenizer's ids over a
//! SentencePiece model, SiglipImageProcessor's pixels on real photos, and
//! SiglipModel's embeddings and sigmoid logits.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use clasp::encoder::Encoder;
use clasp::preprocess::TextTokenizer;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/siglip")
}

#[derive(serde::Deserialize)]
struct Tokens {
    strings: Vec<String>,
    input_ids: Vec<Vec<u32>>,
}

#[test]
fn siglip_tokenizer_matches_transformers_on_214_strings() {
    let t: Tokens =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("tokens.json")).unwrap())
            .unwrap();
    assert_eq!(t.strings.len(), 214);
    let tok = TextTokenizer::from_dir(&fixtures().join("tiny-siglip"), 64).unwrap();
    let got = tok.encode(&t.strings).unwrap();
    let mut bad = Vec::new();
    for (i, s) in t.strings.iter().enumerate() {
        if got.ids[i] != t.input_ids[i] {
            bad.push(format!(
                "{s:?}\n  want {:?}\n  got  {:?}",
                t.input_ids[i], got.ids[i]
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {} differ:\n{}",
        bad.len(),
        t.strings.len(),
        bad.join("\n")
    );
}
