//! Every dataset parser: the first byte picks the format, the rest is the
//! captions file (and, for `pairs`, a CSV/TSV/JSONL file).
use clasp::data::{load_pairs, DatasetSpec, Format, Lang, Split};

fn main() {
    let dir = tempfile::tempdir().unwrap();
    afl::fuzz!(|data: &[u8]| {
        let Some((&pick, body)) = data.split_first() else {
            return;
        };
        let (format, file) = match pick % 7 {
            0 => (Format::Flickr8k, "Flickr8k.token.txt"),
            1 => (Format::Karpathy, "dataset_flickr8k.json"),
            2 => (Format::Coco, "captions_val2017.json"),
            3 => (Format::ChineseClip, "valid_texts.jsonl"),
            4 => (Format::Pairs, "pairs.csv"),
            5 => (Format::Pairs, "pairs.tsv"),
            _ => (Format::Pairs, "pairs.jsonl"),
        };
        let root = dir.path().join(format!("f{}", pick % 7));
        let _ = std::fs::create_dir_all(&root);
        let path = root.join(file);
        if std::fs::write(&path, body).is_err() {
            return;
        }
        let target = match format {
            Format::Pairs => path.clone(),
            _ => root.clone(),
        };
        let spec = DatasetSpec {
            format,
            path: target,
        };
        for split in [Split::Train, Split::Dev] {
            let _ = load_pairs(&spec, split, Lang::En, Some(&root));
        }
        if let Ok(s) = std::str::from_utf8(body) {
            let _ = DatasetSpec::parse(s);
        }
    });
}
