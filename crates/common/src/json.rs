//! JSON files read with their path in every error.

use std::path::Path;

use crate::{Error, Result};

/// Reads a JSON file (a config), naming the file in any error.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_json(&text, path)
}

/// Parses JSON text read from `path` (named in the error).
pub fn parse_json(text: &str, path: &Path) -> Result<serde_json::Value> {
    serde_json::from_str(text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}
