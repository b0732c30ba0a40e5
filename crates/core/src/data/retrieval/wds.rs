//! WebDataset shards (`wds:PATTERN`): tar files whose members are grouped
//! into samples by key as the `webdataset` package groups them (the
//! member's directory and its basename up to the first dot; the rest is the
//! extension), one sample per key run. A sample's image is its first
//! `jpg`/`jpeg`/`png`/`webp` member and its caption its `txt` member, or the
//! `caption` (else `text`) field of its `json` member.
//!
//! The pattern's braces are expanded as the `braceexpand` package does
//! (`{000..009}` keeps the padding, `{a,b}` lists, several groups multiply).
//! Each shard is scanned once for its members' places, and images are read
//! from there when a batch needs them ([`ImageSource::TarMember`]), so images
//! are never all held in memory. A shard is a local file, `pipe:COMMAND`
//! (the command's standard output, run by `sh -c`) or an `http(s)://` URL
//! (fetched as webdataset fetches it, `curl -sSfL URL`); a piped or fetched
//! shard is spooled once into the cache (`$CLASP_CACHE_DIR/wds/`, keyed by
//! the command) and read from there, so a second run fetches nothing.
//! A member that cannot be read, a sample without an image or a caption and
//! a truncated shard are reported by shard and key; the rest is kept.

use super::*;

/// `pattern` with its brace groups expanded, in order.
pub fn expand_braces(pattern: &str) -> Result<Vec<String>> {
    let Some(open) = pattern.find('{') else {
        return Ok(vec![pattern.to_string()]);
    };
    let close = pattern[open..]
        .find('}')
        .map(|c| open + c)
        .ok_or_else(|| Error::Dataset(format!("`{pattern}`: a `{{` without its `}}`")))?;
    let (head, body, tail) = (
        &pattern[..open],
        &pattern[open + 1..close],
        &pattern[close + 1..],
    );
    let options: Vec<String> = match body.split_once("..") {
        Some((a, b)) if !body.contains(',') => {
            let bad = || {
                Error::Dataset(format!(
                    "`{pattern}`: `{{{body}}}` is not a range of numbers"
                ))
            };
            let (lo, hi): (u64, u64) =
                (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
            let width = if a.starts_with('0') || b.starts_with('0') {
                a.len().max(b.len())
            } else {
                0
            };
            let range: Vec<u64> = if lo <= hi {
                (lo..=hi).collect()
            } else {
                (hi..=lo).rev().collect()
            };
            range.into_iter().map(|n| format!("{n:0width$}")).collect()
        }
        _ => body.split(',').map(String::from).collect(),
    };
    let rest = expand_braces(tail)?;
    Ok(options
        .iter()
        .flat_map(|o| rest.iter().map(move |r| format!("{head}{o}{r}")))
        .collect())
}

const IMAGE_EXTS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

/// A sample being gathered: its key and its members by extension.
#[derive(Default)]
struct Sample {
    key: String,
    image: Option<(String, u64, u64)>,
    caption: Option<String>,
    problems: Vec<String>,
}

pub(super) fn webdataset(pattern: &Path, b: &mut Builder) -> Result<()> {
    let text = pattern.to_string_lossy();
    for shard in expand_braces(&text)? {
        let command = if let Some(c) = shard.strip_prefix("pipe:") {
            Some(c.to_string())
        } else if shard.starts_with("http://") || shard.starts_with("https://") {
            Some(format!("curl -sSfL '{}'", shard.replace('\'', "'\\''")))
        } else {
            None
        };
        let path = match command {
            Some(c) => match spool(&c) {
                Ok(p) => p,
                Err(e) => {
                    b.bad(Loc::new(Path::new(&shard), 0), e.to_string(), 0);
                    continue;
                }
            },
            None => PathBuf::from(&shard),
        };
        if !path.is_file() {
            b.bad(Loc::new(&path, 0), format!("missing shard {shard}"), 0);
            continue;
        }
        read_shard(&path, b)?;
    }
    Ok(())
}

/// The cached copy of what `command` writes to its standard output, made
/// once (written beside, renamed when the command succeeded).
fn spool(command: &str) -> Result<PathBuf> {
    let dir = clasp_common::cache_root().join("wds");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let path = dir.join(format!("{}.tar", blake3::hash(command.as_bytes()).to_hex()));
    if path.is_file() {
        return Ok(path);
    }
    let tmp = clasp_common::atomic::temp_beside(&path);
    let out = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let run = std::process::Command::new("sh")
        .args(["-c", command])
        .stdout(out)
        .stderr(std::process::Stdio::piped())
        .output()
        .map_err(|e| Error::Dataset(format!("pipe:{command}: cannot run it: {e}")))?;
    if !run.status.success() {
        let _ = std::fs::remove_file(&tmp);
        let err = String::from_utf8_lossy(&run.stderr);
        return Err(Error::Dataset(format!(
            "pipe:{command}: {} ({})",
            run.status,
            err.trim()
        )));
    }
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    Ok(path)
}

fn read_shard(path: &Path, b: &mut Builder) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let shard: Arc<Path> = Arc::from(path);
    let mut archive = tar::Archive::new(std::io::BufReader::new(file));
    let mut cur = Sample::default();
    let entries = archive.entries().map_err(|e| Error::io(path, e))?;
    for entry in entries {
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) => {
                // A damaged header: nothing after it can be trusted.
                finish_sample(&shard, std::mem::take(&mut cur), b);
                b.bad(
                    Loc::new(path, 0),
                    format!("the shard is damaged or truncated after the members read so far ({e}); the rest is skipped"),
                    0,
                );
                return Ok(());
            }
        };
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = match entry.path() {
            Ok(p) => p.to_string_lossy().into_owned(),
            Err(_) => continue,
        };
        let (dir, base) = match name.rsplit_once('/') {
            Some((d, f)) => (format!("{d}/"), f.to_string()),
            None => (String::new(), name.clone()),
        };
        // Hidden files and `__` members are not samples' (webdataset's rule).
        if base.starts_with('.') || base.starts_with("__") {
            continue;
        }
        let Some((stem, ext)) = base.split_once('.') else {
            continue;
        };
        let key = format!("{dir}{stem}");
        let ext = ext.to_lowercase();
        if key != cur.key {
            finish_sample(
                &shard,
                std::mem::replace(
                    &mut cur,
                    Sample {
                        key,
                        ..Default::default()
                    },
                ),
                b,
            );
        }
        let (offset, size) = (entry.raw_file_position(), entry.size());
        if IMAGE_EXTS.contains(&ext.as_str()) {
            if cur.image.is_none() {
                cur.image = Some((name, offset, size));
            }
            // The data is skipped by the reader; check it is all there.
            let mut sink = std::io::sink();
            if let Err(e) = std::io::copy(&mut entry, &mut sink) {
                cur.problems.push(format!("{ext}: cannot be read ({e})"));
                cur.image = None;
            }
        } else if ext == "txt" || ext == "json" {
            let mut body = String::new();
            use std::io::Read;
            if let Err(e) = entry.read_to_string(&mut body) {
                cur.problems.push(format!("{ext}: not UTF-8 text ({e})"));
                continue;
            }
            if ext == "txt" {
                cur.caption = Some(body.trim().to_string());
            } else if cur.caption.is_none() {
                match serde_json::from_str::<serde_json::Value>(&body) {
                    Ok(v) => {
                        let c = v
                            .get("caption")
                            .or_else(|| v.get("text"))
                            .and_then(|c| c.as_str());
                        cur.caption = c.map(|c| c.trim().to_string());
                    }
                    Err(e) => cur.problems.push(format!("json: {e}")),
                }
            }
        }
    }
    finish_sample(&shard, cur, b);
    Ok(())
}

fn finish_sample(shard: &Arc<Path>, s: Sample, b: &mut Builder) {
    if s.key.is_empty() {
        return;
    }
    let loc = Loc::new(shard, 0).with_record(s.key.clone());
    let id = format!("{}#{}", shard.display(), s.key);
    match (s.image, s.caption) {
        (Some((member, offset, len)), Some(caption)) if !caption.is_empty() => {
            let src = ImageSource::TarMember {
                shard: shard.clone(),
                member,
                offset,
                len,
            };
            b.image(id.clone(), src, loc.clone());
            b.caption(id, caption, None, loc);
        }
        (image, caption) => {
            let mut why = s.problems;
            if image.is_none() && why.is_empty() {
                why.push("no jpg/jpeg/png/webp member".into());
            }
            if caption.as_deref().is_none_or(str::is_empty) {
                why.push("no caption (txt, or json `caption`/`text`)".into());
            }
            b.bad(loc, format!("sample left out: {}", why.join("; ")), 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn braces_expand_as_braceexpand_does() {
        assert_eq!(expand_braces("a.tar").unwrap(), ["a.tar"]);
        assert_eq!(
            expand_braces("s-{000..002}.tar").unwrap(),
            ["s-000.tar", "s-001.tar", "s-002.tar"]
        );
        assert_eq!(
            expand_braces("{a,b}/x{1..2}.tar").unwrap(),
            ["a/x1.tar", "a/x2.tar", "b/x1.tar", "b/x2.tar"]
        );
        assert_eq!(expand_braces("{3..1}").unwrap(), ["3", "2", "1"]);
        assert!(expand_braces("s-{000..00x}.tar").is_err());
        assert!(expand_braces("s-{000.tar").is_err());
    }
}
