//! Progress reporting for long library work. The library reports through this
//! trait; the CLI draws it as a progress bar, and tests pass [`Silent`].

pub trait Progress: Sync {
    /// A new phase of `len` units begins.
    fn start(&self, what: &str, len: u64);
    /// `n` more units are done.
    fn inc(&self, n: u64);
    /// The phase is over.
    fn finish(&self);
}

/// Reports nothing.
pub struct Silent;

impl Progress for Silent {
    fn start(&self, _what: &str, _len: u64) {}
    fn inc(&self, _n: u64) {}
    fn finish(&self) {}
}
