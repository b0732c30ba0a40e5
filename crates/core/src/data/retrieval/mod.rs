//! Image–caption formats: Flickr8k, Karpathy JSON, COCO captions, the
//! Chinese-CLIP jsonl/tsv layout, and generic CSV/TSV/JSONL pairs.
//!
//! Each reader produces raw records; [`Builder`] turns them into a
//! [`PairSet`], reporting duplicates, captions without an image, missing image
//! files and images without captions, and keeping the valid rest.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;

use super::{DataIssue, DatasetSpec, Format, ImageSource, Lang, Loc, PairSet, Split};
use crate::{Error, Result};

mod cnclip;
mod flickr8k;
mod json_captions;
mod pairs;
pub mod wds;

use cnclip::cnclip;
use flickr8k::flickr8k;
use json_captions::{coco, karpathy};
use pairs::pairs;

/// Loads an image–caption set.
pub fn load_pairs(
    spec: &DatasetSpec,
    split: Split,
    lang: Lang,
    image_root: Option<&Path>,
) -> Result<PairSet> {
    let mut b = Builder::default();
    match spec.format {
        Format::Flickr8k => flickr8k(&spec.path, split, lang, image_root, &mut b)?,
        Format::Karpathy => karpathy(&spec.path, split, image_root, &mut b)?,
        Format::Coco => coco(&spec.path, image_root, &mut b)?,
        Format::ChineseClip => cnclip(&spec.path, split, &mut b)?,
        Format::Pairs => pairs(&spec.path, image_root, &mut b)?,
        // Shards have no splits: every sample is used.
        Format::WebDataset => wds::webdataset(&spec.path, &mut b)?,
        Format::Folder => {
            return Err(Error::Dataset(format!(
                "{}: a folder-per-class set has no captions; use it with `eval zeroshot`",
                spec.path.display()
            )))
        }
    }
    let name = format!(
        "{}:{} ({})",
        spec.format.name(),
        spec.path.display(),
        split.as_str()
    );
    b.finish(name)
}

fn issue(loc: Loc, message: impl Into<String>) -> DataIssue {
    DataIssue {
        loc,
        message: message.into(),
        dropped_images: 0,
        dropped_captions: 0,
    }
}

/// Collects raw records and validates them into a `PairSet`.
#[derive(Default)]
pub(crate) struct Builder {
    images: Vec<(String, ImageSource, Loc)>,
    image_index: HashMap<String, usize>,
    /// Ids that exist but belong to another split: their captions are skipped
    /// silently.
    elsewhere: HashSet<String>,
    captions: Vec<(String, String, Loc)>,
    caption_keys: HashMap<String, Loc>,
    issues: Vec<DataIssue>,
}

impl Builder {
    fn image(&mut self, id: String, src: ImageSource, loc: Loc) {
        if let Some(&first) = self.image_index.get(&id) {
            let mut i = issue(
                loc,
                format!(
                    "duplicate image id `{id}` (first at {}); the repeat is ignored",
                    self.images[first].2
                ),
            );
            i.dropped_images = 0;
            self.issues.push(i);
            return;
        }
        self.image_index.insert(id.clone(), self.images.len());
        self.images.push((id, src, loc));
    }

    /// A caption; `key` identifies it for duplicate detection (e.g. `img#3`).
    fn caption(&mut self, image_id: String, text: String, key: Option<String>, loc: Loc) {
        if let Some(key) = key {
            if let Some(first) = self.caption_keys.get(&key) {
                let mut i = issue(
                    loc,
                    format!(
                        "duplicate caption id `{key}` (first at {first}); the repeat is dropped"
                    ),
                );
                i.dropped_captions = 1;
                self.issues.push(i);
                return;
            }
            self.caption_keys.insert(key, loc.clone());
        }
        self.captions.push((image_id, text, loc));
    }

    fn bad(&mut self, loc: Loc, message: impl Into<String>, captions: usize) {
        let mut i = issue(loc, message);
        i.dropped_captions = captions;
        self.issues.push(i);
    }

    fn finish(mut self, name: String) -> Result<PairSet> {
        // Captions, grouped under their image in image order (file order within).
        let mut per_image: Vec<Vec<String>> = vec![Vec::new(); self.images.len()];
        for (img, text, loc) in std::mem::take(&mut self.captions) {
            match self.image_index.get(&img) {
                Some(&i) => per_image[i].push(text),
                None if self.elsewhere.contains(&img) => {}
                None => self.bad(
                    loc,
                    format!("caption for image `{img}`, which is absent from the image list"),
                    1,
                ),
            }
        }
        let mut set = PairSet {
            name,
            ..Default::default()
        };
        for ((id, src, loc), caps) in std::mem::take(&mut self.images).into_iter().zip(per_image) {
            if let ImageSource::File(p) = &src {
                if !p.is_file() {
                    let mut i = issue(loc, format!("missing image file {}", p.display()));
                    i.dropped_images = 1;
                    i.dropped_captions = caps.len();
                    self.issues.push(i);
                    continue;
                }
            }
            if caps.is_empty() {
                let mut i = issue(loc, format!("image `{id}` has no captions"));
                i.dropped_images = 1;
                self.issues.push(i);
                continue;
            }
            let idx = set.images.len();
            set.images.push(src);
            set.image_ids.push(id);
            for c in caps {
                set.captions.push(c);
                set.caption_image.push(idx);
            }
        }
        set.issues = self.issues;
        if set.images.is_empty() {
            let mut msg = format!("{}: no usable image–caption pairs", set.name);
            for i in set.issues.iter().take(5) {
                msg.push_str(&format!("\n  {i}"));
            }
            return Err(Error::Dataset(msg));
        }
        Ok(set)
    }
}

fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    String::from_utf8(bytes)
        .map_err(|e| Error::Dataset(format!("{}: not UTF-8 text: {e}", path.display())))
}

fn first_existing(cands: &[PathBuf]) -> Option<PathBuf> {
    cands.iter().find(|p| p.is_dir()).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    #[test]
    fn flickr8k_reports_malformed_records_and_keeps_the_rest() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        std::fs::create_dir(dir.join("images")).unwrap();
        for f in ["a.jpg", "b.jpg", "c.jpg"] {
            std::fs::write(dir.join("images").join(f), b"x").unwrap();
        }
        write(
            dir,
            "Flickr_8k.devImages.txt",
            "a.jpg\nb.jpg\nmissing.jpg\na.jpg\n",
        );
        write(dir, "Flickr_8k.trainImages.txt", "c.jpg\n");
        write(
            dir,
            "Flickr8k.token.txt",
            "a.jpg#0\tA dog.\na.jpg#1\tA brown dog.\nb.jpg#0\tA cat.\nmissing.jpg#0\tGone.\n\
             c.jpg#0\tTrain caption.\nghost.jpg#0\tNo such image.\nbroken line\na.jpg#0\tDuplicate key.\n",
        );
        let spec = DatasetSpec {
            format: Format::Flickr8k,
            path: dir.to_path_buf(),
        };
        let s = load_pairs(&spec, Split::Dev, Lang::En, None).unwrap();
        assert_eq!(s.image_ids, vec!["a.jpg", "b.jpg"]);
        assert_eq!(s.captions, vec!["A dog.", "A brown dog.", "A cat."]);
        assert_eq!(s.caption_image, vec![0, 0, 1]);
        let msgs: Vec<String> = s.issues.iter().map(|i| i.to_string()).collect();
        let has = |needle: &str| msgs.iter().any(|m| m.contains(needle));
        assert!(
            has("Flickr_8k.devImages.txt:4: duplicate image id `a.jpg`"),
            "{msgs:#?}"
        );
        assert!(
            has("Flickr_8k.devImages.txt:3: missing image file"),
            "{msgs:#?}"
        );
        assert!(
            has("Flickr8k.token.txt:6: caption for image `ghost.jpg`"),
            "{msgs:#?}"
        );
        assert!(
            has("Flickr8k.token.txt:7: malformed caption line"),
            "{msgs:#?}"
        );
        assert!(
            has("Flickr8k.token.txt:8: duplicate caption id `a.jpg#0`"),
            "{msgs:#?}"
        );
        // The train caption belongs to another split: not an issue.
        assert!(!has("c.jpg"), "{msgs:#?}");
        assert_eq!(s.dropped_images(), 1);
        // missing.jpg's caption, ghost, broken line, duplicate key.
        assert_eq!(s.dropped_captions(), 4);
    }

    #[test]
    fn flickr8k_empty_or_absent_split_is_an_error_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "Flickr_8k.devImages.txt", "\n");
        write(d.path(), "Flickr8k.token.txt", "");
        let spec = DatasetSpec {
            format: Format::Flickr8k,
            path: d.path().to_path_buf(),
        };
        let e = load_pairs(&spec, Split::Dev, Lang::En, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("Flickr_8k.devImages.txt:1: split `dev` is empty"),
            "{e}"
        );
        let e = load_pairs(&spec, Split::Test, Lang::En, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("Flickr_8k.testImages.txt: split list not found") && e.contains("has: dev"),
            "{e}"
        );
    }

    #[test]
    fn jsonl_pairs_report_bad_lines() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("x.png"), b"x").unwrap();
        let p = write(
            d.path(),
            "pairs.jsonl",
            "{\"image\": \"x.png\", \"caption\": \"one\"}\n{not json\n{\"image\": \"x.png\", \"text\": \"two\"}\n{\"image\": \"y.png\", \"caption\": \"three\"}\n",
        );
        let spec = DatasetSpec::parse(p.to_str().unwrap()).unwrap();
        assert_eq!(spec.format, Format::Pairs);
        let s = load_pairs(&spec, Split::All, Lang::En, None).unwrap();
        assert_eq!(s.captions, vec!["one", "two"]);
        let msgs: Vec<String> = s.issues.iter().map(|i| i.to_string()).collect();
        assert!(
            msgs.iter()
                .any(|m| m.contains("pairs.jsonl:2: bad JSON line")),
            "{msgs:?}"
        );
        assert!(
            msgs.iter()
                .any(|m| m.contains("pairs.jsonl:4: missing image file")),
            "{msgs:?}"
        );
    }

    #[test]
    fn csv_and_karpathy_and_coco() {
        let d = tempfile::tempdir().unwrap();
        for f in ["a.jpg", "b.jpg"] {
            std::fs::write(d.path().join(f), b"x").unwrap();
        }
        let p = write(
            d.path(),
            "p.csv",
            "filepath,title\na.jpg,\"red, round\"\nb.jpg,blue\n",
        );
        let s = load_pairs(
            &DatasetSpec::parse(p.to_str().unwrap()).unwrap(),
            Split::All,
            Lang::En,
            None,
        )
        .unwrap();
        assert_eq!(s.captions, vec!["red, round", "blue"]);

        let k = write(
            d.path(),
            "dataset_flickr30k.json",
            r#"{"dataset": "flickr30k", "images": [
              {"filename": "a.jpg", "split": "test", "sentences": [{"raw": "A.", "sentid": 0}, {"raw": "A2.", "sentid": 1}]},
              {"filename": "b.jpg", "split": "train", "sentences": [{"raw": "B.", "sentid": 2}]}]}"#,
        );
        let spec = DatasetSpec::parse(k.to_str().unwrap()).unwrap();
        assert_eq!(spec.format, Format::Karpathy);
        let s = load_pairs(&spec, Split::Test, Lang::En, None).unwrap();
        assert_eq!(
            (s.image_ids.clone(), s.captions.len()),
            (vec!["a.jpg".to_string()], 2)
        );

        let c = write(
            d.path(),
            "captions_x.json",
            r#"{"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}],
                "annotations": [{"id": 5, "image_id": 1, "caption": "A."}, {"id": 6, "image_id": 9, "caption": "?"}]}"#,
        );
        let spec = DatasetSpec::parse(c.to_str().unwrap()).unwrap();
        assert_eq!(spec.format, Format::Coco);
        let s = load_pairs(&spec, Split::All, Lang::En, None).unwrap();
        assert_eq!(s.captions, vec!["A."]);
        let msgs: Vec<String> = s.issues.iter().map(|i| i.to_string()).collect();
        assert!(
            msgs.iter()
                .any(|m| m.contains("images[1]") && m.contains("duplicate image id `1`")),
            "{msgs:?}"
        );
        assert!(
            msgs.iter()
                .any(|m| m.contains("annotations[1]") && m.contains("`9`")),
            "{msgs:?}"
        );
    }

    #[test]
    fn chinese_clip_layout_with_inline_images() {
        let d = tempfile::tempdir().unwrap();
        let png = base64::engine::general_purpose::STANDARD.encode(b"\x89PNG fake");
        write(d.path(), "valid_imgs.tsv", &format!("1\t{png}\n2\t{png}\n"));
        write(
            d.path(),
            "valid_texts.jsonl",
            "{\"text_id\": 1, \"text\": \"红苹果\", \"image_ids\": [1]}\n{\"text_id\": 2, \"text\": \"猫\", \"image_ids\": [2]}\n{bad\n",
        );
        let spec = DatasetSpec::parse(d.path().to_str().unwrap()).unwrap();
        assert_eq!(spec.format, Format::ChineseClip);
        let s = load_pairs(&spec, Split::Dev, Lang::Zh, None).unwrap();
        assert_eq!(s.captions, vec!["红苹果", "猫"]);
        assert!(matches!(s.images[0], ImageSource::Inline { .. }));
        assert!(s.issues[0]
            .to_string()
            .contains("valid_texts.jsonl:3: bad JSON line"));
    }
}
