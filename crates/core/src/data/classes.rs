//! Folder-per-class classification sets: `DIR/<class>/<image>`, classes in
//! sorted folder order (as torchvision's ImageFolder numbers them).

use std::path::Path;

use super::files::list_image_files;
use super::{ClassSet, DataIssue, ImageSource, Loc};
use crate::{Error, Result};

pub fn load_classification(dir: &Path) -> Result<ClassSet> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut class_dirs: Vec<_> = rd
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.path())
        .collect();
    class_dirs.sort();
    if class_dirs.is_empty() {
        return Err(Error::Dataset(format!(
            "{}: no class folders (expected DIR/<class>/<images>)",
            dir.display()
        )));
    }
    let mut set = ClassSet::default();
    for cd in class_dirs {
        let name = cd
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        let (files, skipped) = list_image_files(&cd)?;
        if skipped > 0 {
            set.issues.push(DataIssue {
                loc: Loc::new(&cd, 0),
                message: format!("{skipped} non-image files skipped"),
                dropped_images: skipped,
                dropped_captions: 0,
            });
        }
        if files.is_empty() {
            set.issues.push(DataIssue {
                loc: Loc::new(&cd, 0),
                message: format!("class `{name}` has no images"),
                dropped_images: 0,
                dropped_captions: 0,
            });
        }
        let label = set.classes.len();
        set.classes.push(name);
        for f in files {
            set.images.push(ImageSource::File(f));
            set.labels.push(label);
        }
    }
    if set.images.is_empty() {
        return Err(Error::Dataset(format!(
            "{}: no images in any class folder",
            dir.display()
        )));
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_are_sorted_folders() {
        let d = tempfile::tempdir().unwrap();
        for (c, n) in [("dog", 2), ("cat", 1), ("empty", 0)] {
            std::fs::create_dir(d.path().join(c)).unwrap();
            for i in 0..n {
                std::fs::write(d.path().join(c).join(format!("{i}.jpg")), b"x").unwrap();
            }
        }
        std::fs::write(d.path().join("dog").join("notes.txt"), b"x").unwrap();
        let s = load_classification(d.path()).unwrap();
        assert_eq!(s.classes, vec!["cat", "dog", "empty"]);
        assert_eq!(s.labels, vec![0, 1, 1]);
        assert_eq!(s.issues.len(), 2);
    }
}
