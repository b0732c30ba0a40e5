//! CLIP's BPE vocabulary, bundled: `bpe_simple_vocab_16e6.txt.gz`, the file
//! OpenAI's CLIP and open_clip ship inside their packages (MIT licensed;
//! `crates/core/assets/`, 1.3 MB compressed), so that an open_clip folder
//! without `vocab.json`/`merges.txt` and a `clasp train --preset` without
//! `--tokenizer` have CLIP's tokenizer.
//!
//! open_clip's `SimpleTokenizer` builds its vocabulary from the file: the
//! 256 byte symbols (GPT-2's byte-to-unicode table), the same with `</w>`,
//! one token per merge of the file's first 48,894, then the start and end
//! of text (ids 49406 and 49407). transformers' `vocab.json` and
//! `merges.txt` for CLIP are that vocabulary and those merges, which is
//! what [`vocab_json`] and [`merges_txt`] give.

use std::io::Read;
use std::sync::OnceLock;

use serde_json::{Map, Value};

static GZ: &[u8] = include_bytes!("../../assets/bpe_simple_vocab_16e6.txt.gz");

/// How many merges CLIP's vocabulary keeps (49152 − 256 − 2).
const MERGES: usize = 48_894;

/// The merges, in priority order.
fn merges() -> &'static [(String, String)] {
    static M: OnceLock<Vec<(String, String)>> = OnceLock::new();
    M.get_or_init(|| {
        let mut text = String::new();
        flate2::read::GzDecoder::new(GZ)
            .read_to_string(&mut text)
            .expect("the bundled BPE file is valid gzip UTF-8");
        // The first line is the file's version header.
        text.lines()
            .skip(1)
            .take(MERGES)
            .map(|l| {
                let (a, b) = l.split_once(' ').expect("a merge is two symbols");
                (a.to_string(), b.to_string())
            })
            .collect()
    })
}

/// GPT-2's byte-to-unicode table in CLIP's order: the printable bytes
/// first (`!`..`~`, `¡`..`¬`, `®`..`ÿ`) as themselves, then the others
/// mapped from U+0100 up.
fn byte_symbols() -> Vec<char> {
    let printable = |b: u32| {
        (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
    };
    let mut out: Vec<char> = (0..256u32)
        .filter(|&b| printable(b))
        .filter_map(char::from_u32)
        .collect();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable(b) {
            out.push(char::from_u32(256 + n).expect("U+0100.. are chars"));
            n += 1;
        }
    }
    out
}

/// The vocabulary as transformers' CLIP `vocab.json`: token to id.
pub fn vocab_json() -> Value {
    let mut v = Map::new();
    let mut add = |t: String| {
        let id = v.len();
        v.insert(t, Value::from(id));
    };
    let bytes = byte_symbols();
    for c in &bytes {
        add(c.to_string());
    }
    for c in &bytes {
        add(format!("{c}</w>"));
    }
    for (a, b) in merges() {
        add(format!("{a}{b}"));
    }
    add("<|startoftext|>".into());
    add("<|endoftext|>".into());
    Value::Object(v)
}

/// The merges as transformers' CLIP `merges.txt`.
pub fn merges_txt() -> String {
    let mut s = String::from("#version: 0.2\n");
    for (a, b) in merges() {
        s.push_str(a);
        s.push(' ');
        s.push_str(b);
        s.push('\n');
    }
    s
}

/// Writes `vocab.json` and `merges.txt` into `dir`.
pub fn write(dir: &std::path::Path) -> crate::Result<()> {
    let v = dir.join("vocab.json");
    std::fs::write(
        &v,
        serde_json::to_string(&vocab_json()).expect("JSON serialises"),
    )
    .map_err(|e| crate::Error::io(&v, e))?;
    let m = dir.join("merges.txt");
    std::fs::write(&m, merges_txt()).map_err(|e| crate::Error::io(&m, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bundled vocabulary and merges equal transformers' files for
    /// openai/clip-vit-base-patch32 (../shared/assets), token for token.
    #[test]
    fn bundled_bpe_equals_transformers_clip_files() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/assets/clip-vit-base-patch32");
        let want: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("vocab.json")).unwrap())
                .unwrap();
        let got = vocab_json();
        assert_eq!(got.as_object().unwrap().len(), 49_408);
        assert_eq!(got, want);
        let want_merges = std::fs::read_to_string(dir.join("merges.txt")).unwrap();
        let got_merges = merges_txt();
        assert_eq!(
            got_merges.lines().collect::<Vec<_>>(),
            want_merges.lines().collect::<Vec<_>>()
        );
    }
}
