//! Walking the folders to index: image files with their size and mtime, and
//! everything that cannot be indexed with the reason (broken symlinks,
//! symlink loops, unreadable directories, unsupported formats).

use std::path::{Path, PathBuf};

use globset::{Glob, GlobSet, GlobSetBuilder};

use crate::{Error, Result};
use clasp_core::data::files::has_image_extension;

#[derive(Clone, Debug)]
pub struct Found {
    pub path: PathBuf,
    pub size: u64,
    pub mtime_ns: i64,
}

#[derive(Clone, Debug)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: String,
}

/// Image formats people keep photos in that clasp cannot decode; they are
/// reported rather than silently ignored.
const UNSUPPORTED: &[&str] = &[
    "heic", "heif", "avif", "jxl", "svg", "psd", "raw", "cr2", "cr3", "nef", "arw", "dng", "orf",
    "rw2", "ico",
];

pub fn globset(patterns: &[String]) -> Result<GlobSet> {
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        let g = Glob::new(p).map_err(|e| Error::Dataset(format!("--exclude `{p}`: {e}")))?;
        b.add(g);
    }
    b.build()
        .map_err(|e| Error::Dataset(format!("--exclude: {e}")))
}

/// Canonical absolute form of a root folder, or an error naming it.
pub fn canonical_root(root: &Path) -> Result<PathBuf> {
    let c = root.canonicalize().map_err(|e| Error::io(root, e))?;
    if !c.is_dir() {
        return Err(Error::Dataset(format!(
            "{}: not a directory",
            root.display()
        )));
    }
    Ok(c)
}

pub fn mtime_ns(meta: &std::fs::Metadata) -> i64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Walks `root` (already canonical), following symlinks, skipping hidden
/// entries and excluded paths (globs match the path relative to the root, or
/// the absolute path). Videos are found too when `videos` is set.
pub fn scan(root: &Path, excludes: &GlobSet, videos: bool) -> (Vec<Found>, Vec<Skipped>) {
    let mut found = Vec::new();
    let mut skipped = Vec::new();
    let excluded = |p: &Path| {
        !excludes.is_empty()
            && (excludes.is_match(p)
                || p.strip_prefix(root)
                    .map(|r| excludes.is_match(r))
                    .unwrap_or(false))
    };
    let walker = walkdir::WalkDir::new(root)
        .follow_links(true)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| {
            let hidden = e.depth() > 0 && e.file_name().to_string_lossy().starts_with('.');
            !hidden && !excluded(e.path())
        });
    for entry in walker {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                let path = e
                    .path()
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| root.to_path_buf());
                let reason = if let Some(anc) = e.loop_ancestor() {
                    format!(
                        "directory loop through symlinks (back to {})",
                        anc.display()
                    )
                } else if path
                    .symlink_metadata()
                    .map(|m| m.file_type().is_symlink())
                    .unwrap_or(false)
                    && !path.exists()
                {
                    "broken symlink".to_string()
                } else {
                    e.io_error()
                        .map(|io| io.to_string())
                        .unwrap_or_else(|| e.to_string())
                };
                skipped.push(Skipped { path, reason });
                continue;
            }
        };
        if !entry.file_type().is_file() {
            continue;
        }
        let path = entry.path().to_path_buf();
        let wanted =
            has_image_extension(&path) || (videos && super::video_segments::is_video(&path));
        if !wanted {
            let ext = path
                .extension()
                .and_then(|e| e.to_str())
                .unwrap_or("")
                .to_ascii_lowercase();
            if UNSUPPORTED.contains(&ext.as_str()) {
                skipped.push(Skipped {
                    path,
                    reason: format!("unsupported image format (.{ext})"),
                });
            }
            continue;
        }
        match entry.metadata() {
            Ok(m) => found.push(Found {
                path,
                size: m.len(),
                mtime_ns: mtime_ns(&m),
            }),
            Err(e) => skipped.push(Skipped {
                path,
                reason: e.to_string(),
            }),
        }
    }
    (found, skipped)
}

/// Text that describes an image for hybrid search: a sidecar caption file
/// (`photo.jpg.txt`, `photo.txt` or `photo.caption`), the EXIF
/// ImageDescription, and the file name's words.
pub fn caption_for(path: &Path, bytes: &[u8]) -> String {
    let mut parts = Vec::new();
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    let side = [
        PathBuf::from(format!("{}.txt", path.display())),
        path.with_extension("txt"),
        path.with_extension("caption"),
    ];
    if let Some(text) = side.iter().find_map(|p| std::fs::read_to_string(p).ok()) {
        parts.push(text.trim().to_string());
    }
    if let Ok(exif) = exif::Reader::new().read_from_container(&mut std::io::Cursor::new(bytes)) {
        if let Some(f) = exif.get_field(exif::Tag::ImageDescription, exif::In::PRIMARY) {
            if let exif::Value::Ascii(v) = &f.value {
                for s in v {
                    let s = String::from_utf8_lossy(s).trim().to_string();
                    if !s.is_empty() {
                        parts.push(s);
                    }
                }
            }
        }
    }
    parts.push(stem.replace(['_', '-', '.'], " "));
    parts.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_broken_links_loops_and_unsupported_formats() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().canonicalize().unwrap();
        std::fs::create_dir(root.join("sub")).unwrap();
        std::fs::write(root.join("a.jpg"), b"x").unwrap();
        std::fs::write(root.join("sub/b.png"), b"xy").unwrap();
        std::fs::write(root.join("notes.txt"), b"x").unwrap();
        std::fs::write(root.join("phone.HEIC"), b"x").unwrap();
        std::fs::write(root.join(".hidden.jpg"), b"x").unwrap();
        std::os::unix::fs::symlink(root.join("nowhere.jpg"), root.join("broken.jpg")).unwrap();
        std::os::unix::fs::symlink(&root, root.join("sub/loop")).unwrap();
        std::fs::create_dir(root.join("skipme")).unwrap();
        std::fs::write(root.join("skipme/c.jpg"), b"x").unwrap();
        let (found, skipped) = scan(&root, &globset(&["skipme".into()]).unwrap(), false);
        let names: Vec<_> = found
            .iter()
            .map(|f| f.path.strip_prefix(&root).unwrap().display().to_string())
            .collect();
        assert_eq!(names, vec!["a.jpg", "sub/b.png"]);
        assert_eq!(found[1].size, 2);
        let why = |n: &str| {
            skipped
                .iter()
                .find(|s| s.path.display().to_string().ends_with(n))
                .map(|s| s.reason.clone())
                .unwrap_or_else(|| panic!("{n} not skipped: {skipped:?}"))
        };
        assert_eq!(why("broken.jpg"), "broken symlink");
        assert!(why("sub/loop").contains("directory loop"));
        assert!(why("phone.HEIC").contains("unsupported image format"));
    }
}
