//! Listing a folder's image files (by extension), for class folders, `--images-from` and the indexer.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Files in a directory that look like images, sorted by path; the others are
/// counted so an empty result can say what was there.
pub fn list_image_files(dir: &Path) -> Result<(Vec<PathBuf>, usize)> {
    let mut images = Vec::new();
    let mut skipped = 0;
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let p = entry.path();
        if p.is_file() && has_image_extension(&p) {
            images.push(p);
        } else {
            skipped += 1;
        }
    }
    images.sort();
    Ok((images, skipped))
}

pub fn has_image_extension(p: &Path) -> bool {
    const EXTS: &[&str] = &["jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"];
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTS.contains(&e.to_ascii_lowercase().as_str()))
}
