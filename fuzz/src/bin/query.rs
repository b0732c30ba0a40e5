//! The search query algebra: `"a dog" + 2:"snow" - night`, as one string
//! and as shell words (split at NUL).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Ok(s) = std::str::from_utf8(data) {
            let _ = clasp::index::query::parse_expr(s);
            let words: Vec<String> = s.split('\0').map(String::from).collect();
            let _ = clasp::index::query::parse(&words);
        }
    });
}
