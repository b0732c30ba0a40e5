//! Flickr8k: `Flickr8k.token.txt` (and Flickr8k-CN) with the split lists.
use super::*;

pub(super) fn flickr8k(
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
