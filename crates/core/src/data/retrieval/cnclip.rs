//! Chinese-CLIP's jsonl + base64 tsv layout.
use super::*;

/// Chinese-CLIP's layout: `{split}_texts.jsonl` with
/// `{"text_id", "text", "image_ids": [..]}` and `{split}_imgs.tsv` with
/// `image_id<TAB>base64 image`.
pub(super) fn cnclip(dir: &Path, split: Split, b: &mut Builder) -> Result<()> {
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
