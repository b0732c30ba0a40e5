//! The config readers: a model's config.json, preprocessor_config.json, and a
//! tokenizer folder (tokenizer.json / vocab files) read as a model's text side.
use std::path::Path;

fn main() {
    let dir = tempfile::tempdir().unwrap();
    afl::fuzz!(|data: &[u8]| {
        if let Ok(s) = std::str::from_utf8(data) {
            let p = Path::new("config.json");
            let _ = clasp::model::ModelConfig::from_json(s, p);
            let _ = clasp::preprocess::image::ImageProcessorConfig::from_json(s, p);
        }
        // The same bytes as a tokenizer.json beside a small real config.
        let _ = std::fs::write(dir.path().join("tokenizer.json"), data);
        let _ = clasp::preprocess::text::TextTokenizer::from_dir(dir.path(), 16);
    });
}
