//! Generic CSV/TSV/JSONL (image, caption) records.
use super::*;

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
pub(super) fn pairs(path: &Path, image_root: Option<&Path>, b: &mut Builder) -> Result<()> {
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
