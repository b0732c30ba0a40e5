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
        Format::Folder => {
            return Err(Error::Dataset(format!(
                "{}: a folder-per-class set has no captions; use it with `eval zeroshot`",
                spec.path.display()
            )))
        }
    }
    let name = format!(
        "{}:{} ({})",
        fmt_name(spec.format),
        spec.path.display(),
        split.as_str()
    );
    b.finish(name)
}

fn fmt_name(f: Format) -> &'static str {
    match f {
        Format::Flickr8k => "flickr8k",
        Format::Karpathy => "karpathy",
        Format::Coco => "coco",
        Format::ChineseClip => "cnclip",
        Format::Pairs => "pairs",
        Format::Folder => "folder",
    }
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

// ---------------------------------------------------------------- Flickr8k

fn flickr8k(
    dir: &Path,
    split: Split,
    lang: Lang,
    image_root: Option<&Path>,
    b: &mut Builder,
) -> Result<()> {
    let img_dir = match image_root {
        Some(r) => r.to_path_buf(),
        None => first_existing(&[
            dir.join("images"),
            dir.join("Flicker8k_Dataset"),
            dir.join("Flickr8k_Dataset"),
        ])
        .unwrap_or_else(|| dir.to_path_buf()),
    };
    let list = |s: &str| dir.join(format!("Flickr_8k.{s}Images.txt"));
    let wanted: Vec<&str> = match split {
        Split::Train => vec!["train"],
        Split::Dev => vec!["dev"],
        Split::Test => vec!["test"],
        Split::All => vec!["train", "dev", "test"],
    };
    let mut any_list = false;
    for s in ["train", "dev", "test"] {
        let path = list(s);
        if !path.exists() {
            if wanted.contains(&s) && split != Split::All {
                return Err(Error::Dataset(format!(
                    "{}: split list not found (this Flickr8k copy has: {})",
                    path.display(),
                    ["train", "dev", "test"]
                        .iter()
                        .filter(|x| list(x).exists())
                        .copied()
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            continue;
        }
        any_list = true;
        let body = read_text(&path)?;
        let mut n = 0;
        for (ln, line) in body.lines().enumerate() {
            let id = line.trim();
            if id.is_empty() {
                continue;
            }
            n += 1;
            if wanted.contains(&s) {
                b.image(
                    id.to_string(),
                    ImageSource::File(img_dir.join(id)),
                    Loc::new(&path, ln + 1),
                );
            } else {
                b.elsewhere.insert(id.to_string());
            }
        }
        if n == 0 && wanted.contains(&s) {
            b.issues
                .push(issue(Loc::new(&path, 1), format!("split `{s}` is empty")));
        }
    }
    let (cap_path, zh) = match lang {
        Lang::En => (dir.join("Flickr8k.token.txt"), false),
        Lang::Zh => (dir.join("flickr8kzhc.caption.txt"), true),
    };
    let body = read_text(&cap_path)?;
    let mut captioned = Vec::new();
    for (ln, line) in body.lines().enumerate() {
        let loc = Loc::new(&cap_path, ln + 1);
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        // EN: `img.jpg#0<TAB>caption`; ZH: `img.jpg#zhc#0 caption`.
        let parsed = if zh {
            line.split_once(char::is_whitespace)
                .and_then(|(k, c)| k.split_once("#zhc#").map(|(img, n)| (img, n, c)))
        } else {
            line.split_once('\t')
                .and_then(|(k, c)| k.rsplit_once('#').map(|(img, n)| (img, n, c)))
        };
        let Some((img, n, cap)) = parsed else {
            b.bad(
                loc,
                "malformed caption line (expected `IMAGE#N<TAB>CAPTION`)",
                1,
            );
            continue;
        };
        let cap = cap.trim();
        if cap.is_empty() {
            b.bad(loc, "empty caption", 1);
            continue;
        }
        if !any_list {
            captioned.push(img.to_string());
        }
        b.caption(
            img.to_string(),
            cap.to_string(),
            Some(format!("{img}#{n}")),
            loc,
        );
    }
    if !any_list {
        // No split lists at all: every captioned image is the set.
        let mut seen = HashSet::new();
        for id in captioned {
            if seen.insert(id.clone()) {
                b.image(
                    id.clone(),
                    ImageSource::File(img_dir.join(&id)),
                    Loc::new(&cap_path, 0),
                );
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- Karpathy

fn json_file(path: &Path) -> Result<serde_json::Value> {
    let text = read_text(path)?;
    serde_json::from_str(&text).map_err(|e| {
        Error::Dataset(format!(
            "{}:{}: invalid JSON: {e}",
            path.display(),
            e.line()
        ))
    })
}

fn karpathy(path: &Path, split: Split, image_root: Option<&Path>, b: &mut Builder) -> Result<()> {
    let v = json_file(path)?;
    let base = path.parent().unwrap_or(Path::new("."));
    let images = v.get("images").and_then(|x| x.as_array()).ok_or_else(|| {
        Error::Dataset(format!(
            "{}: no `images` array (not a Karpathy split file)",
            path.display()
        ))
    })?;
    let dataset = v.get("dataset").and_then(|d| d.as_str()).unwrap_or("");
    let root = match image_root {
        Some(r) => r.to_path_buf(),
        None => {
            let mut c = vec![
                base.join("images"),
                base.join(format!("{dataset}-images")),
                base.to_path_buf(),
            ];
            if dataset == "flickr30k" {
                c.insert(0, base.join("flickr30k-images"));
            }
            first_existing(&c).unwrap_or_else(|| base.to_path_buf())
        }
    };
    let loc = |i: usize| Loc::new(path, 0).with_record(format!("images[{i}]"));
    for (i, im) in images.iter().enumerate() {
        let Some(file) = im.get("filename").and_then(|x| x.as_str()) else {
            b.bad(loc(i), "image record without `filename`", 0);
            continue;
        };
        let s = im.get("split").and_then(|x| x.as_str()).unwrap_or("");
        let in_split = match split {
            Split::All => true,
            Split::Train => s == "train" || s == "restval",
            Split::Dev => s == "val",
            Split::Test => s == "test",
        };
        let id = match im.get("filepath").and_then(|x| x.as_str()) {
            Some(fp) if !fp.is_empty() => format!("{fp}/{file}"),
            _ => file.to_string(),
        };
        if !in_split {
            b.elsewhere.insert(id);
            continue;
        }
        let src = if root.join(&id).exists() || !root.join(file).exists() {
            root.join(&id)
        } else {
            root.join(file)
        };
        b.image(id.clone(), ImageSource::File(src), loc(i));
        let sents = im
            .get("sentences")
            .and_then(|x| x.as_array())
            .cloned()
            .unwrap_or_default();
        for (j, s) in sents.iter().enumerate() {
            match s.get("raw").and_then(|x| x.as_str()) {
                Some(raw) if !raw.trim().is_empty() => {
                    let key = s.get("sentid").map(|x| x.to_string());
                    b.caption(id.clone(), raw.trim().to_string(), key, loc(i));
                }
                _ => b.bad(loc(i), format!("sentence {j} has no `raw` text"), 1),
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- COCO

fn coco(path: &Path, image_root: Option<&Path>, b: &mut Builder) -> Result<()> {
    let v = json_file(path)?;
    let base = path.parent().unwrap_or(Path::new("."));
    let root = match image_root {
        Some(r) => r.to_path_buf(),
        None => {
            // annotations/captions_val2017.json -> ../val2017/
            let stem = path.file_stem().unwrap_or_default().to_string_lossy();
            let part = stem.strip_prefix("captions_").unwrap_or(&stem).to_string();
            let up = base.parent().unwrap_or(base);
            first_existing(&[
                base.join(&part),
                up.join(&part),
                base.join("images"),
                base.to_path_buf(),
            ])
            .unwrap_or_else(|| base.to_path_buf())
        }
    };
    let arr = |k: &str| {
        v.get(k).and_then(|x| x.as_array()).ok_or_else(|| {
            Error::Dataset(format!(
                "{}: no `{k}` array (not a COCO captions file)",
                path.display()
            ))
        })
    };
    for (i, im) in arr("images")?.iter().enumerate() {
        let loc = Loc::new(path, 0).with_record(format!("images[{i}]"));
        let (Some(id), Some(file)) = (im.get("id"), im.get("file_name").and_then(|x| x.as_str()))
        else {
            b.bad(loc, "image record without `id` or `file_name`", 0);
            continue;
        };
        b.image(id.to_string(), ImageSource::File(root.join(file)), loc);
    }
    for (i, a) in arr("annotations")?.iter().enumerate() {
        let loc = Loc::new(path, 0).with_record(format!("annotations[{i}]"));
        let (Some(img), Some(cap)) = (a.get("image_id"), a.get("caption").and_then(|x| x.as_str()))
        else {
            b.bad(loc, "annotation without `image_id` or `caption`", 1);
            continue;
        };
        let key = a.get("id").map(|x| x.to_string());
        b.caption(img.to_string(), cap.trim().to_string(), key, loc);
    }
    Ok(())
}

// ---------------------------------------------------------------- Chinese-CLIP

/// Chinese-CLIP's layout: `{split}_texts.jsonl` with
/// `{"text_id", "text", "image_ids": [..]}` and `{split}_imgs.tsv` with
/// `image_id<TAB>base64 image`.
fn cnclip(dir: &Path, split: Split, b: &mut Builder) -> Result<()> {
    let names: Vec<&str> = match split {
        Split::Train => vec!["train"],
        Split::Dev => vec!["valid"],
        Split::Test => vec!["test"],
        Split::All => vec!["train", "valid", "test"],
    };
    let mut found = false;
    for s in names {
        let texts = dir.join(format!("{s}_texts.jsonl"));
        let imgs = dir.join(format!("{s}_imgs.tsv"));
        if !texts.exists() && !imgs.exists() {
            continue;
        }
        found = true;
        let body = read_text(&imgs)?;
        let mut n = 0;
        for (ln, line) in body.lines().enumerate() {
            let loc = Loc::new(&imgs, ln + 1);
            if line.trim().is_empty() {
                continue;
            }
            n += 1;
            let Some((id, b64)) = line.split_once('\t') else {
                b.bad(loc, "malformed line (expected `IMAGE_ID<TAB>BASE64`)", 0);
                continue;
            };
            match base64::engine::general_purpose::STANDARD.decode(b64.trim()) {
                Ok(data) => b.image(
                    id.trim().to_string(),
                    ImageSource::Inline {
                        name: format!("{}:{}#{}", imgs.display(), ln + 1, id.trim()),
                        data: Arc::from(data),
                    },
                    loc,
                ),
                Err(e) => b.bad(
                    loc,
                    format!("image `{}`: invalid base64: {e}", id.trim()),
                    0,
                ),
            }
        }
        if n == 0 {
            b.issues.push(issue(
                Loc::new(&imgs, 1),
                format!("split `{s}` has no images"),
            ));
        }
        let body = read_text(&texts)?;
        for (ln, line) in body.lines().enumerate() {
            let loc = Loc::new(&texts, ln + 1);
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = match serde_json::from_str(line) {
                Ok(v) => v,
                Err(e) => {
                    b.bad(loc, format!("bad JSON line: {e}"), 1);
                    continue;
                }
            };
            let text = v.get("text").and_then(|x| x.as_str());
            let ids = v.get("image_ids").and_then(|x| x.as_array());
            let (Some(text), Some(ids)) = (text, ids) else {
                b.bad(loc, "record needs `text` and `image_ids`", 1);
                continue;
            };
            let Some(first) = ids.first() else {
                b.bad(loc, "`image_ids` is empty", 1);
                continue;
            };
            if ids.len() > 1 {
                b.issues.push(issue(
                    loc.clone(),
                    format!(
                        "text lists {} images; clasp scores it against the first only",
                        ids.len()
                    ),
                ));
            }
            let img = match first {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let key = v.get("text_id").map(|x| x.to_string());
            b.caption(img, text.trim().to_string(), key, loc);
        }
    }
    if !found {
        return Err(Error::Dataset(format!(
            "{}: no Chinese-CLIP files for split `{}` (expected e.g. valid_texts.jsonl and valid_imgs.tsv)",
            dir.display(),
            split.as_str()
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------- generic

const IMAGE_KEYS: [&str; 7] = [
    "image",
    "filepath",
    "file_name",
    "filename",
    "path",
    "img",
    "image_path",
];
const TEXT_KEYS: [&str; 5] = ["caption", "text", "title", "sentence", "txt"];

/// A generic CSV/TSV (with a header) or JSONL of (image, caption) records.
fn pairs(path: &Path, image_root: Option<&Path>, b: &mut Builder) -> Result<()> {
    let base = image_root
        .map(Path::to_path_buf)
        .unwrap_or_else(|| path.parent().unwrap_or(Path::new(".")).to_path_buf());
    let name = path.to_string_lossy().to_lowercase();
    let mut seen: HashSet<String> = HashSet::new();
    let mut add = |b: &mut Builder, img: &str, cap: &str, loc: Loc| {
        let img = img.trim();
        let cap = cap.trim();
        if img.is_empty() || cap.is_empty() {
            b.bad(loc, "empty image or caption field", 1);
            return;
        }
        if seen.insert(img.to_string()) {
            let p = Path::new(img);
            let p = if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            };
            b.image(img.to_string(), ImageSource::File(p), loc.clone());
        }
        b.caption(img.to_string(), cap.to_string(), None, loc);
    };
    if name.ends_with(".jsonl") {
        let body = read_text(path)?;
        for (ln, line) in body.lines().enumerate() {
            let loc = Loc::new(path, ln + 1);
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = match serde_json::from_str(line) {
                Ok(v) => v,
                Err(e) => {
                    b.bad(loc, format!("bad JSON line: {e}"), 1);
                    continue;
                }
            };
            let img = IMAGE_KEYS
                .iter()
                .find_map(|k| v.get(*k).and_then(|x| x.as_str()));
            let cap = TEXT_KEYS
                .iter()
                .find_map(|k| v.get(*k).and_then(|x| x.as_str()));
            match (img, cap) {
                (Some(i), Some(c)) => add(b, i, c, loc),
                _ => b.bad(
                    loc,
                    format!(
                        "record needs an image key ({}) and a caption key ({})",
                        IMAGE_KEYS.join("/"),
                        TEXT_KEYS.join("/")
                    ),
                    1,
                ),
            }
        }
        return Ok(());
    }
    let delim = if name.ends_with(".tsv") { b'\t' } else { b',' };
    let mut rdr = csv::ReaderBuilder::new()
        .delimiter(delim)
        .flexible(true)
        .from_path(path)
        .map_err(|e| Error::Dataset(format!("{}: {e}", path.display())))?;
    let headers = rdr
        .headers()
        .map_err(|e| Error::Dataset(format!("{}:1: {e}", path.display())))?
        .clone();
    let col = |keys: &[&str]| {
        headers
            .iter()
            .position(|h| keys.contains(&h.trim().to_lowercase().as_str()))
    };
    let (Some(ic), Some(tc)) = (col(&IMAGE_KEYS), col(&TEXT_KEYS)) else {
        return Err(Error::Dataset(format!(
            "{}:1: header needs an image column ({}) and a caption column ({})",
            path.display(),
            IMAGE_KEYS.join("/"),
            TEXT_KEYS.join("/")
        )));
    };
    for rec in rdr.records() {
        match rec {
            Ok(r) => {
                let line = r.position().map(|p| p.line() as usize).unwrap_or(0);
                let loc = Loc::new(path, line);
                match (r.get(ic), r.get(tc)) {
                    (Some(i), Some(c)) => add(b, i, c, loc),
                    _ => b.bad(loc, "row is missing the image or caption field", 1),
                }
            }
            Err(e) => {
                let line = e.position().map(|p| p.line() as usize).unwrap_or(0);
                b.bad(Loc::new(path, line), format!("unreadable row: {e}"), 1);
            }
        }
    }
    Ok(())
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
