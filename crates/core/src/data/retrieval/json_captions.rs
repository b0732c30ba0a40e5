//! Karpathy's split JSON and COCO captions JSON.
use super::*;

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

pub(super) fn karpathy(
    path: &Path,
    split: Split,
    image_root: Option<&Path>,
    b: &mut Builder,
) -> Result<()> {
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

pub(super) fn coco(path: &Path, image_root: Option<&Path>, b: &mut Builder) -> Result<()> {
    let v = json_file(path)?;
    let base = path.parent().unwrap_or(Path::new("."));
    let root = match image_root {
        Some(r) => r.to_path_buf(),
        None => {
            // annotations/captions_val2017.json -> ../val2017/
            let stem = path.file_stem().unwrap_or_default().to_string_lossy();
            let part = stem.strip_prefix("captions_").unwrap_or(&stem).to_string();
            // Only COCO's own layout looks beside the annotations folder;
            // elsewhere the parent is not the dataset's (e.g. /tmp).
            let mut candidates = vec![base.join(&part)];
            if base.file_name().is_some_and(|n| n == "annotations") {
                candidates.push(base.parent().unwrap_or(base).join(&part));
            }
            candidates.extend([base.join("images"), base.to_path_buf()]);
            first_existing(&candidates).unwrap_or_else(|| base.to_path_buf())
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
