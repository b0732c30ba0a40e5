//! The README is the front door: every command block of its quickstart runs
//! as written, from the repository root, with the `clasp` this build made
//! on the PATH, so the first thing a user tries cannot rot.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The ```sh blocks between `## Quickstart` and the next `## ` heading.
fn quickstart_blocks(readme: &str) -> Vec<String> {
    let start = readme
        .find("\n## Quickstart")
        .expect("the README has a Quickstart section");
    let rest = &readme[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |i| i + 3);
    let section = &rest[..end];
    let mut blocks = Vec::new();
    let mut lines = section.lines();
    while let Some(line) = lines.next() {
        if line.trim() == "```sh" {
            let body: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
            blocks.push(body.join("\n"));
        }
    }
    blocks
}

fn run_block(block: &str) -> (i32, String, String) {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_clasp")).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let o = Command::new("bash")
        .args(["-euo", "pipefail", "-c", block])
        .current_dir(root())
        .env("PATH", path)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn the_readme_is_short_and_every_quickstart_block_runs() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let n = readme.lines().count();
    assert!(
        n <= 250,
        "README.md is {n} lines; the rest belongs in docs/"
    );
    let blocks = quickstart_blocks(&readme);
    assert!(blocks.len() >= 3, "quickstart blocks: {blocks:?}");
    // A fresh start for what the blocks write (out/ is git-ignored).
    for f in [
        "quickstart.image.npy",
        "quickstart.text.npy",
        "quickstart.image.paths.txt",
        "quickstart.sqlite",
    ] {
        let _ = std::fs::remove_file(root().join("out").join(f));
    }
    let mut ran = Vec::new();
    for block in &blocks {
        let (code, out, err) = run_block(block);
        assert_eq!(
            code, 0,
            "README block failed:\n{block}\nstdout:\n{out}\nstderr:\n{err}"
        );
        ran.push((block.clone(), out));
    }
    // What the blocks say they do, checked on what they left.
    let by = |cmd: &str| {
        ran.iter()
            .find(|(b, _)| b.contains(cmd))
            .unwrap_or_else(|| panic!("no quickstart block runs `{cmd}`"))
            .1
            .clone()
    };
    let out = root().join("out");
    let image = std::fs::read(out.join("quickstart.image.npy")).unwrap();
    assert_eq!(&image[..6], b"\x93NUMPY");
    let paths = std::fs::read_to_string(out.join("quickstart.image.paths.txt")).unwrap();
    assert_eq!(paths.lines().count(), 2, "{paths}");
    assert!(
        std::fs::read(out.join("quickstart.text.npy"))
            .unwrap()
            .len()
            > 128
    );
    // `search -k 3` prints three hits after `index`, and `classify` a label
    // for each indexed image (11 decodable fixture images).
    let search_then_classify = by("clasp search");
    let lines: Vec<&str> = search_then_classify.lines().collect();
    assert!(
        lines.len() >= 3 + 11,
        "search + classify printed:\n{search_then_classify}"
    );
    assert!(lines[3..].iter().all(|l| ["cat\t", "dog\t", "square\t"]
        .iter()
        .any(|p| l.starts_with(p))));
    let answer = by("clasp generate");
    assert!(!answer.trim().is_empty(), "generate printed nothing");
}
