//! Dataset formats, read natively: image–caption sets for retrieval and
//! training, and folder-per-class sets for classification.
//!
//! A dataset is named by a spec, `FORMAT:PATH`, or just `PATH` where the
//! format can be told from the path. Every loader reports malformed records
//! (with file and line) as [`DataIssue`]s and keeps the valid rest, so one bad
//! line never stops an evaluation.

mod classes;
pub mod files;
pub mod objects;
mod retrieval;
pub mod singular;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use classes::load_classification;
pub use retrieval::load_pairs;
pub use retrieval::wds::expand_braces;

use crate::{Error, Result};

/// Which part of a dataset to read (in configs: `train`, `dev`, `test`, `all`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Split {
    Train,
    Dev,
    Test,
    All,
}

impl Split {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "train" => Split::Train,
            "dev" | "val" | "valid" | "validation" => Split::Dev,
            "test" => Split::Test,
            "all" => Split::All,
            _ => {
                return Err(Error::Dataset(format!(
                    "unknown split `{s}` (use train, dev, test or all)"
                )))
            }
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Dev => "dev",
            Split::Test => "test",
            Split::All => "all",
        }
    }
}

/// Caption language, for datasets that carry several (in configs: `en`, `zh`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Lang {
    En,
    Zh,
}

impl Lang {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "en" => Ok(Lang::En),
            "zh" | "cn" => Ok(Lang::Zh),
            _ => Err(Error::Dataset(format!(
                "unknown language `{s}` (use en or zh)"
            ))),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Lang::En => "en",
            Lang::Zh => "zh",
        }
    }
}

/// Where an image's bytes come from: a file, bytes carried inside the
/// dataset file (Chinese-CLIP's base64 TSV), or a member of a tar shard (a
/// WebDataset), read from its place when needed.
#[derive(Clone, Debug)]
pub enum ImageSource {
    File(PathBuf),
    Inline {
        name: String,
        data: Arc<[u8]>,
    },
    TarMember {
        shard: Arc<Path>,
        /// The member's name inside the shard.
        member: String,
        /// Where its data starts in the shard, and its length.
        offset: u64,
        len: u64,
    },
}

impl ImageSource {
    /// A name for messages and reports.
    pub fn display_name(&self) -> String {
        match self {
            ImageSource::File(p) => p.display().to_string(),
            ImageSource::Inline { name, .. } => name.clone(),
            ImageSource::TarMember { shard, member, .. } => {
                format!("{}#{member}", shard.display())
            }
        }
    }
    /// A shard member's WebDataset sample key: its name up to the first dot
    /// of the basename, as the `webdataset` package groups members (and as
    /// clip-retrieval writes `image_path` for WebDataset input); `None` for
    /// other sources.
    pub fn sample_key(&self) -> Option<String> {
        match self {
            ImageSource::TarMember { member, .. } => {
                let base = member.rfind('/').map_or(0, |i| i + 1);
                let end = member[base..].find('.').map_or(member.len(), |i| base + i);
                Some(member[..end].to_string())
            }
            _ => None,
        }
    }
    /// The path used in error messages (a pseudo-path for inline images and
    /// shard members: `SHARD#MEMBER`).
    pub fn path(&self) -> PathBuf {
        match self {
            ImageSource::File(p) => p.clone(),
            ImageSource::Inline { name, .. } => PathBuf::from(name),
            ImageSource::TarMember { .. } => PathBuf::from(self.display_name()),
        }
    }
    pub fn read(&self) -> Result<Arc<[u8]>> {
        match self {
            ImageSource::File(p) => Ok(std::fs::read(p).map_err(|e| Error::io(p, e))?.into()),
            ImageSource::Inline { data, .. } => Ok(data.clone()),
            ImageSource::TarMember {
                shard, offset, len, ..
            } => {
                use std::io::{Read, Seek, SeekFrom};
                let io = |e| Error::io(shard.as_ref(), e);
                let mut f = std::fs::File::open(shard).map_err(io)?;
                let size = f.metadata().map_err(io)?.len();
                if offset.saturating_add(*len) > size {
                    return Err(Error::Dataset(format!(
                        "{}: the shard is {size} bytes, shorter than it was when indexed (truncated?)",
                        self.display_name()
                    )));
                }
                f.seek(SeekFrom::Start(*offset)).map_err(io)?;
                let mut buf = vec![0u8; *len as usize];
                f.read_exact(&mut buf).map_err(io)?;
                Ok(buf.into())
            }
        }
    }
}

/// A place in a dataset file, for messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loc {
    pub file: PathBuf,
    /// 1-based; 0 when the record has no line (a JSON array element).
    pub line: usize,
    /// The record inside the file, e.g. `images[17]`, where lines say little.
    pub record: Option<String>,
}

impl Loc {
    pub fn new(file: &Path, line: usize) -> Self {
        Self {
            file: file.to_path_buf(),
            line,
            record: None,
        }
    }
    pub fn with_record(mut self, record: String) -> Self {
        self.record = Some(record);
        self
    }
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}", self.line)?;
        }
        if let Some(r) = &self.record {
            write!(f, " {r}")?;
        }
        Ok(())
    }
}

/// A malformed or dropped record. `dropped` counts the items it removed.
#[derive(Clone, Debug)]
pub struct DataIssue {
    pub loc: Loc,
    pub message: String,
    pub dropped_images: usize,
    pub dropped_captions: usize,
}

impl fmt::Display for DataIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.loc, self.message)
    }
}

/// An image–caption dataset: every caption points at one image, and an image
/// may have several captions.
#[derive(Clone, Debug, Default)]
pub struct PairSet {
    pub name: String,
    pub images: Vec<ImageSource>,
    /// Dataset ids of the images (file names or ids), parallel to `images`.
    pub image_ids: Vec<String>,
    pub captions: Vec<String>,
    /// For each caption, the index of its image in `images`.
    pub caption_image: Vec<usize>,
    pub issues: Vec<DataIssue>,
}

impl PairSet {
    /// Each image's captions, in order.
    pub fn references(&self) -> Vec<Vec<&str>> {
        let mut refs = vec![Vec::new(); self.images.len()];
        for (c, &i) in self.caption_image.iter().enumerate() {
            refs[i].push(self.captions[c].as_str());
        }
        refs
    }

    pub fn dropped_images(&self) -> usize {
        self.issues.iter().map(|i| i.dropped_images).sum()
    }
    pub fn dropped_captions(&self) -> usize {
        self.issues.iter().map(|i| i.dropped_captions).sum()
    }

    /// Removes images (by index) and their captions, recording why.
    pub fn remove_images(&mut self, bad: &[(usize, DataIssue)]) {
        if bad.is_empty() {
            return;
        }
        let mut keep = vec![true; self.images.len()];
        for (i, issue) in bad {
            keep[*i] = false;
            let n_caps = self.caption_image.iter().filter(|&&c| c == *i).count();
            let mut issue = issue.clone();
            issue.dropped_images = 1;
            issue.dropped_captions = n_caps;
            self.issues.push(issue);
        }
        let mut remap = vec![usize::MAX; self.images.len()];
        let mut images = Vec::new();
        let mut ids = Vec::new();
        for (i, k) in keep.iter().enumerate() {
            if *k {
                remap[i] = images.len();
                images.push(self.images[i].clone());
                ids.push(self.image_ids[i].clone());
            }
        }
        let mut captions = Vec::new();
        let mut cap_img = Vec::new();
        for (t, &im) in self.caption_image.iter().enumerate() {
            if keep[im] {
                captions.push(std::mem::take(&mut self.captions[t]));
                cap_img.push(remap[im]);
            }
        }
        self.images = images;
        self.image_ids = ids;
        self.captions = captions;
        self.caption_image = cap_img;
    }
}

/// A classification set: images with integer labels into `classes`.
#[derive(Clone, Debug, Default)]
pub struct ClassSet {
    pub classes: Vec<String>,
    pub images: Vec<ImageSource>,
    pub labels: Vec<usize>,
    pub issues: Vec<DataIssue>,
}

/// The dataset formats clasp reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Flickr8k,
    Karpathy,
    Coco,
    ChineseClip,
    Pairs,
    Folder,
    /// WebDataset tar shards (`wds:PATTERN`, braces expanded).
    WebDataset,
}

impl Format {
    pub const NAMES: &'static str =
        "flickr8k, karpathy, coco, cnclip, csv|tsv|jsonl (generic pairs), folder, wds (WebDataset shards)";

    /// The name `FORMAT:PATH` specs use for this format.
    pub fn name(self) -> &'static str {
        match self {
            Format::Flickr8k => "flickr8k",
            Format::Karpathy => "karpathy",
            Format::Coco => "coco",
            Format::ChineseClip => "cnclip",
            Format::Pairs => "pairs",
            Format::Folder => "folder",
            Format::WebDataset => "wds",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "flickr8k" => Format::Flickr8k,
            "karpathy" => Format::Karpathy,
            "coco" => Format::Coco,
            "cnclip" | "chinese-clip" | "chinese_clip" => Format::ChineseClip,
            "csv" | "tsv" | "jsonl" | "pairs" => Format::Pairs,
            "folder" | "imagefolder" => Format::Folder,
            "wds" | "webdataset" => Format::WebDataset,
            _ => return None,
        })
    }
}

/// A parsed dataset spec (in configs: the `FORMAT:PATH` string).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DatasetSpec {
    pub format: Format,
    pub path: PathBuf,
}

impl DatasetSpec {
    /// Parses `FORMAT:PATH` or detects the format of a bare `PATH`.
    pub fn parse(spec: &str) -> Result<Self> {
        if let Some((fmt, rest)) = spec.split_once(':') {
            // A Windows drive letter is not a format.
            if fmt.len() > 1 {
                return match Format::parse(fmt) {
                    Some(format) => Ok(Self {
                        format,
                        path: PathBuf::from(rest),
                    }),
                    None => Err(Error::Dataset(format!(
                        "unknown dataset format `{fmt}` in `{spec}`; known formats: {}",
                        Format::NAMES
                    ))),
                };
            }
        }
        let path = PathBuf::from(spec);
        let format = detect(&path)?;
        Ok(Self { format, path })
    }
}

/// Config values: specs, splits and languages are strings in TOML and in a
/// run's saved state, parsed (and checked) when the config is read.
macro_rules! string_conversions {
    ($t:ty, $to:expr) => {
        impl TryFrom<String> for $t {
            type Error = Error;
            fn try_from(s: String) -> Result<Self> {
                <$t>::parse(&s)
            }
        }
        impl From<$t> for String {
            fn from(v: $t) -> String {
                let f: fn(&$t) -> String = $to;
                f(&v)
            }
        }
    };
}
string_conversions!(Split, |s| s.as_str().to_string());
string_conversions!(Lang, |l| l.as_str().to_string());
string_conversions!(DatasetSpec, |d| format!(
    "{}:{}",
    d.format.name(),
    d.path.display()
));

fn detect(path: &Path) -> Result<Format> {
    let text = path.to_string_lossy();
    if text.ends_with(".tar") && (text.contains('{') || path.is_file()) {
        return Ok(Format::WebDataset);
    }
    if !path.exists() {
        return Err(Error::Dataset(format!(
            "{}: no such file or directory",
            path.display()
        )));
    }
    if path.is_dir() {
        if path.join("Flickr8k.token.txt").exists() || path.join("flickr8kzhc.caption.txt").exists()
        {
            return Ok(Format::Flickr8k);
        }
        let has_cnclip = std::fs::read_dir(path)
            .map_err(|e| Error::io(path, e))?
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with("_texts.jsonl"));
        if has_cnclip {
            return Ok(Format::ChineseClip);
        }
        return Ok(Format::Folder);
    }
    let name = path
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .to_lowercase();
    if name.ends_with(".csv") || name.ends_with(".tsv") || name.ends_with(".jsonl") {
        return Ok(Format::Pairs);
    }
    if name.ends_with(".json") {
        // Karpathy files have `images[].sentences`; COCO has `annotations`.
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let head = &text[..text.len().min(1 << 20)];
        if head.contains("\"annotations\"") {
            return Ok(Format::Coco);
        }
        if head.contains("\"sentences\"") {
            return Ok(Format::Karpathy);
        }
    }
    Err(Error::Dataset(format!(
        "{}: cannot tell the dataset format; write it as FORMAT:PATH with one of: {}",
        path.display(),
        Format::NAMES
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parsing() {
        let s = DatasetSpec::parse("flickr8k:/data/f8k").unwrap();
        assert_eq!(s.format, Format::Flickr8k);
        assert_eq!(s.path, PathBuf::from("/data/f8k"));
        let e = DatasetSpec::parse("nope:/x").unwrap_err().to_string();
        assert!(
            e.contains("unknown dataset format `nope`") && e.contains("flickr8k"),
            "{e}"
        );
        let e = DatasetSpec::parse("/definitely/not/here")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/definitely/not/here"), "{e}");
    }

    #[test]
    fn a_shard_members_key_ends_at_the_first_dot_of_its_basename() {
        let m = |member: &str| ImageSource::TarMember {
            shard: Arc::from(Path::new("/d/000.tar")),
            member: member.into(),
            offset: 0,
            len: 0,
        };
        assert_eq!(m("000000123.jpg").sample_key().unwrap(), "000000123");
        assert_eq!(m("a.b/c/x1.seg.png").sample_key().unwrap(), "a.b/c/x1");
        assert_eq!(ImageSource::File("/x.jpg".into()).sample_key(), None);
    }

    #[test]
    fn remove_images_remaps_captions() {
        let mut s = PairSet {
            images: (0..3)
                .map(|i| ImageSource::File(format!("{i}.jpg").into()))
                .collect(),
            image_ids: vec!["a".into(), "b".into(), "c".into()],
            captions: vec!["a1".into(), "b1".into(), "c1".into(), "b2".into()],
            caption_image: vec![0, 1, 2, 1],
            ..Default::default()
        };
        let issue = DataIssue {
            loc: Loc::new(Path::new("x"), 3),
            message: "bad".into(),
            dropped_images: 0,
            dropped_captions: 0,
        };
        s.remove_images(&[(1, issue)]);
        assert_eq!(s.image_ids, vec!["a", "c"]);
        assert_eq!(s.captions, vec!["a1", "c1"]);
        assert_eq!(s.caption_image, vec![0, 1]);
        assert_eq!(s.dropped_images(), 1);
        assert_eq!(s.dropped_captions(), 2);
    }
}
