//! GGUF: the header, metadata and tensor table, the tokenizer it carries,
//! and every tensor's bytes.
fn main() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    afl::fuzz!(|data: &[u8]| {
        if std::fs::write(&path, data).is_err() {
            return;
        }
        let Ok(mut g) = clasp::llm::gguf::GgufFile::open(&path) else {
            return;
        };
        let _ = clasp::llm::tokenizer::LlmTokenizer::from_gguf(&g);
        let names: Vec<String> = g.content().tensor_infos.keys().cloned().collect();
        for n in names.iter().take(16) {
            let _ = g.raw(n);
        }
        let _ = clasp::llm::config::LlamaConfig::from_gguf(&g);
    });
}
