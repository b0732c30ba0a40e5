//! Writing files and folders so that a crash leaves either the old one or
//! the new one: each is written beside its destination under a name no other
//! writer uses, then renamed into place.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{Error, Result};

/// A temporary sibling of `path` that no other writer in this or another
/// process uses (process id and a counter), so concurrent writers of the
/// same destination never write into one file.
pub fn temp_beside(path: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

/// Writes `v` as pretty JSON to `path`: to a temporary sibling, then
/// renamed into place.
pub fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::Report(e.to_string()))?;
    write_bytes(path, text.as_bytes())
}

/// Writes `bytes` to `path`: to a temporary sibling, then renamed into place.
pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_beside(path);
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Fills a temporary sibling folder with `fill`, then swaps it into `dir`.
pub fn write_dir(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "checkpoint".into());
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    // Named as the folder the user asked for: the temporary one is ours.
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(dir, e))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{temp_beside, write_dir};

    #[test]
    fn temporary_names_are_never_reused() {
        let p = std::path::Path::new("/x/store.sqlite.m1.vecs");
        let (a, b) = (temp_beside(p), temp_beside(p));
        assert_ne!(a, b);
        assert_eq!(a.parent(), p.parent());
        assert!(a
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".store.sqlite.m1.vecs.tmp-"));
    }

    #[test]
    fn a_failed_fill_keeps_the_old_folder_and_leaves_no_temporary() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("ckpt");
        let put = |name: &'static str, text: &'static str| {
            move |t: &std::path::Path| -> crate::Result<()> {
                std::fs::write(t.join(name), text).unwrap();
                Ok(())
            }
        };
        write_dir(&dir, put("a", "1")).unwrap();
        let r = write_dir(&dir, |t| {
            std::fs::write(t.join("a"), "2").unwrap();
            Err(crate::Error::Report("disk full".into()))
        });
        assert!(r.is_err());
        assert_eq!(std::fs::read_to_string(dir.join("a")).unwrap(), "1");
        write_dir(&dir, put("b", "3")).unwrap();
        assert!(!dir.join("a").exists() && dir.join("b").exists());
        let left: Vec<_> = std::fs::read_dir(d.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "only the checkpoint folder remains");
    }

    #[test]
    fn an_unwritable_place_is_reported_by_the_folder_asked_for() {
        // /proc exists, and no one (root included) can make a folder in it:
        // the failure is at the temporary folder beside the output.
        let dir = std::path::Path::new("/proc/clasp-atomic-test-out");
        let e = write_dir(dir, |_| Ok(())).unwrap_err().to_string();
        assert!(e.contains("/proc/clasp-atomic-test-out"), "{e}");
        assert!(!e.contains(".tmp-"), "no temporary name in: {e}");
    }
}
