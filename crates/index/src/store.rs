//! The store behind a trait: what indexing, search and classification need
//! from wherever the catalog and the vectors live. Two implement it:
//! - [`Catalog`]: the embedded store (SQLite, with memory-mapped snapshots
//!   searched in process, exactly or by HNSW);
//! - [`super::postgres::PgStore`]: PostgreSQL with pgvector, searched by the
//!   server.
//!
//! Both keep the same semantics: files keyed by path with size, mtime,
//! BLAKE3 hash, status and caption; vectors keyed by (model, content hash);
//! every write in one transaction that bumps the store's generation.

use std::path::Path;

use super::catalog::{Catalog, FileRow, Hash, Writer};
use super::engine::{self, VectorSearch};
use crate::{Error, Result};

/// Writes inside one transaction.
pub trait StoreWriter {
    fn upsert_file(&mut self, f: &FileRow) -> Result<()>;
    /// Renames a file's row (a move), keeping its hash and vectors.
    fn move_file(&mut self, from: &str, to: &FileRow) -> Result<()>;
    fn remove_file(&mut self, path: &str) -> Result<()>;
    /// Stores a vector; an existing one for the same (model, hash) is kept
    /// (the same content embeds to the same vector).
    fn put_vector(&mut self, model: i64, hash: &Hash, v: &[f32]) -> Result<()>;
    /// Drops vectors whose content no file has any more.
    fn drop_orphan_vectors(&mut self) -> Result<usize>;
}

/// A model registered in a store.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelRow {
    pub id: i64,
    pub key: Hash,
    pub spec: String,
    pub dim: usize,
}

pub trait Store: Send {
    /// The store as a person names it: a path, or a URL without its password.
    fn describe(&self) -> String;
    /// A counter bumped by every change to files or vectors.
    fn generation(&mut self) -> Result<i64>;
    /// Registers a model (by content hash) and returns its id.
    fn model_id(&mut self, key: &Hash, spec: &str, dim: usize) -> Result<i64>;
    /// Every model the store holds.
    fn models(&mut self) -> Result<Vec<ModelRow>>;
    /// A model hash remembered for a weights file of this size and mtime.
    fn remembered_model_key(
        &mut self,
        weights: &Path,
        size: u64,
        mtime_ns: i64,
    ) -> Result<Option<Hash>>;
    fn remember_model_file(
        &mut self,
        id: i64,
        weights: &Path,
        size: u64,
        mtime_ns: i64,
    ) -> Result<()>;
    /// The most recently used model's spec.
    fn last_model_spec(&mut self) -> Result<Option<String>>;
    /// Every file whose path is one of `prefixes` or under it (all if
    /// empty), in path order.
    fn files_under(&mut self, prefixes: &[String]) -> Result<Vec<FileRow>>;
    /// Every file whose content hash is one of `hashes`; the files of one
    /// content in path order.
    fn files_with_hashes(&mut self, hashes: &[Hash]) -> Result<Vec<FileRow>>;
    /// The search text of the file at `path`, if the store has the file.
    fn caption_of(&mut self, path: &str) -> Result<Option<String>>;
    /// Which of `hashes` have a vector for `model`.
    fn has_vectors(&mut self, model: i64, hashes: &[Hash]) -> Result<Vec<bool>>;
    /// All vectors of a model whose hash belongs to an embeddable file, in
    /// hash order.
    fn model_vectors(&mut self, model: i64) -> Result<Vec<(Hash, Vec<f32>)>>;
    /// Calls `f` with each of `model_vectors`'s rows; a store may read them
    /// more cheaply than collecting them (the embedded store maps its
    /// snapshot file).
    fn for_each_vector(&mut self, model: i64, f: &mut dyn FnMut(Hash, &[f32])) -> Result<()> {
        for (h, v) in self.model_vectors(model)? {
            f(h, &v);
        }
        Ok(())
    }
    /// Runs `f` in one transaction, bumping the generation.
    fn write_dyn(&mut self, f: &mut dyn FnMut(&mut dyn StoreWriter) -> Result<()>) -> Result<()>;
    /// Full-text search over captions: (path, score), best first.
    fn text_search(&mut self, query: &str, limit: usize) -> Result<Vec<(String, f64)>>;
    /// Consistency problems (none when consistent): every embeddable file
    /// has a vector for `model`, no vector is orphaned, the store's own
    /// integrity.
    fn check(&mut self, model: Option<i64>) -> Result<Vec<String>>;
    /// The search engine over a model's vectors.
    fn engine(&mut self, model: i64, ann_threshold: usize) -> Result<Box<dyn VectorSearch>>;
    /// Claims content hashes for embedding, so that two writers on one
    /// store embed each content once: true for those this writer may
    /// embed now. A store with one writer at a time claims everything.
    fn claim(&mut self, hashes: &[Hash]) -> Result<Vec<bool>> {
        Ok(vec![true; hashes.len()])
    }
    /// Waits until no other writer holds `hash`'s claim, then holds it.
    fn claim_wait(&mut self, _hash: &Hash) -> Result<()> {
        Ok(())
    }
    /// Releases every claim this writer holds.
    fn release_claims(&mut self) -> Result<()> {
        Ok(())
    }
}

impl dyn Store + '_ {
    /// What describes the file at `path` for a person: its sidecar caption
    /// and EXIF description, i.e. its search text without the file-name
    /// words that end it. None when it has neither, or the store does not
    /// have the file.
    pub fn description_of(&mut self, path: &str) -> Result<Option<String>> {
        Ok(self.caption_of(path)?.and_then(|c| {
            let d = c.rsplit_once('\n').map_or("", |(head, _)| head).trim();
            (!d.is_empty()).then(|| d.to_string())
        }))
    }

    /// Runs `f` in one transaction, bumping the generation, and returns its
    /// value.
    pub fn write<T>(&mut self, f: impl FnOnce(&mut dyn StoreWriter) -> Result<T>) -> Result<T> {
        let mut f = Some(f);
        let mut out = None;
        self.write_dyn(&mut |w| {
            let f = f.take().expect("a store runs its write closure once");
            out = Some(f(w)?);
            Ok(())
        })?;
        Ok(out.expect("the write closure ran"))
    }
}

/// Whether `spec` names a PostgreSQL store rather than a SQLite file.
pub fn is_postgres(spec: &str) -> bool {
    spec.starts_with("postgres://") || spec.starts_with("postgresql://")
}

/// How to reach a server store.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// Connecting and each statement give up after this long.
    pub timeout: std::time::Duration,
    /// Read replicas for searches (PostgreSQL only).
    pub replicas: Vec<String>,
    /// pgvector's column type for a model's vectors when its table is made:
    /// `vector` (f32) or `halfvec` (f16, half the space).
    pub vector_type: VectorType,
    /// A sharded PostgreSQL store answers from the shards that answer when
    /// one does not (the search is then flagged partial:
    /// `VectorSearch::unanswered`), instead of failing.
    pub allow_partial: bool,
}

/// How a PostgreSQL store keeps vectors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VectorType {
    #[default]
    Vector,
    Halfvec,
}

impl VectorType {
    /// pgvector's type name (also the prefix of its operator classes).
    pub fn sql(self) -> &'static str {
        match self {
            VectorType::Vector => "vector",
            VectorType::Halfvec => "halfvec",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "vector" => Some(VectorType::Vector),
            "halfvec" => Some(VectorType::Halfvec),
            _ => None,
        }
    }
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            timeout: std::time::Duration::from_secs(10),
            replicas: Vec::new(),
            vector_type: VectorType::Vector,
            allow_partial: false,
        }
    }
}

/// Opens the store named by `spec`: a `postgres://` URL, or a SQLite file
/// (created when `create`, else it must exist).
pub fn open(spec: &str, create: bool, opts: &ConnectOptions) -> Result<Box<dyn Store>> {
    if is_postgres(spec) {
        return Ok(Box::new(super::postgres::PgStore::connect(spec, opts)?));
    }
    if !opts.replicas.is_empty() {
        return Err(Error::Report(format!(
            "{spec}: --replica needs a PostgreSQL store (postgres://...)"
        )));
    }
    let p = Path::new(spec);
    Ok(Box::new(if create {
        Catalog::open(p)?
    } else {
        Catalog::open_existing(p)?
    }))
}

struct SqliteWriter<'a, 'b>(&'a Writer<'b>);

impl StoreWriter for SqliteWriter<'_, '_> {
    fn upsert_file(&mut self, f: &FileRow) -> Result<()> {
        self.0.upsert_file(f)
    }
    fn move_file(&mut self, from: &str, to: &FileRow) -> Result<()> {
        self.0.move_file(from, to)
    }
    fn remove_file(&mut self, path: &str) -> Result<()> {
        self.0.remove_file(path)
    }
    fn put_vector(&mut self, model: i64, hash: &Hash, v: &[f32]) -> Result<()> {
        self.0.put_vector(model, hash, v)
    }
    fn drop_orphan_vectors(&mut self) -> Result<usize> {
        self.0.drop_orphan_vectors()
    }
}

impl Store for Catalog {
    fn describe(&self) -> String {
        self.path().display().to_string()
    }
    fn generation(&mut self) -> Result<i64> {
        Catalog::generation(self)
    }
    fn model_id(&mut self, key: &Hash, spec: &str, dim: usize) -> Result<i64> {
        Catalog::model_id(self, key, spec, dim)
    }
    fn models(&mut self) -> Result<Vec<ModelRow>> {
        Catalog::models(self)
    }
    fn remembered_model_key(
        &mut self,
        weights: &Path,
        size: u64,
        mtime_ns: i64,
    ) -> Result<Option<Hash>> {
        Catalog::remembered_model_key(self, weights, size, mtime_ns)
    }
    fn remember_model_file(
        &mut self,
        id: i64,
        weights: &Path,
        size: u64,
        mtime_ns: i64,
    ) -> Result<()> {
        Catalog::remember_model_file(self, id, weights, size, mtime_ns)
    }
    fn last_model_spec(&mut self) -> Result<Option<String>> {
        Catalog::last_model_spec(self)
    }
    fn files_under(&mut self, prefixes: &[String]) -> Result<Vec<FileRow>> {
        Catalog::files_under(self, prefixes)
    }
    fn files_with_hashes(&mut self, hashes: &[Hash]) -> Result<Vec<FileRow>> {
        Catalog::files_with_hashes(self, hashes)
    }
    fn caption_of(&mut self, path: &str) -> Result<Option<String>> {
        Catalog::caption_of(self, path)
    }
    fn has_vectors(&mut self, model: i64, hashes: &[Hash]) -> Result<Vec<bool>> {
        Catalog::has_vectors(self, model, hashes)
    }
    fn model_vectors(&mut self, model: i64) -> Result<Vec<(Hash, Vec<f32>)>> {
        Catalog::model_vectors(self, model)
    }
    fn for_each_vector(&mut self, model: i64, f: &mut dyn FnMut(Hash, &[f32])) -> Result<()> {
        let snap = engine::Snapshot::open(self, model)?;
        for r in 0..snap.n {
            f(snap.hash(r), snap.row(r));
        }
        Ok(())
    }
    fn write_dyn(&mut self, f: &mut dyn FnMut(&mut dyn StoreWriter) -> Result<()>) -> Result<()> {
        Catalog::write(self, |w| f(&mut SqliteWriter(w)))
    }
    fn text_search(&mut self, query: &str, limit: usize) -> Result<Vec<(String, f64)>> {
        Catalog::text_search(self, query, limit)
    }
    fn check(&mut self, model: Option<i64>) -> Result<Vec<String>> {
        Catalog::check(self, model)
    }
    fn engine(&mut self, model: i64, ann_threshold: usize) -> Result<Box<dyn VectorSearch>> {
        engine::open_engine(self, model, ann_threshold)
    }
}

/// What [`copy`] did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CopySummary {
    pub models: usize,
    pub files: usize,
    /// Vectors written (all models); those the target had already are not
    /// counted.
    pub vectors: usize,
    /// Vectors the target had already (a resumed copy).
    pub vectors_present: usize,
}

/// Files per transaction when copying.
const COPY_CHUNK: usize = 1000;

/// Copies every model, file and vector of `from` into `to`, without
/// re-embedding. Each chunk of files goes in one transaction with the
/// vectors of their content, so an interrupted copy leaves `to`
/// consistent and a second run carries on (what `to` has is kept). The
/// counts are verified at the end: every file of `from` is in `to`, and
/// every vector of `from` has its (model, content) in `to`.
pub fn copy(
    from: &mut dyn Store,
    to: &mut dyn Store,
    progress: &dyn crate::progress::Progress,
) -> Result<CopySummary> {
    use std::collections::HashMap;
    let mut summary = CopySummary::default();
    let models = from.models()?;
    // (target model id, the source's vectors by content)
    let mut plan: Vec<(i64, HashMap<Hash, Vec<f32>>)> = Vec::new();
    for m in &models {
        let id = to.model_id(&m.key, &m.spec, m.dim)?;
        plan.push((id, from.model_vectors(m.id)?.into_iter().collect()));
    }
    summary.models = models.len();
    let files = from.files_under(&[])?;
    progress.start("copying", files.len() as u64);
    for chunk in files.chunks(COPY_CHUNK) {
        let hashes: Vec<Hash> = {
            let mut h: Vec<Hash> = chunk.iter().filter_map(|f| f.hash).collect();
            h.sort_unstable();
            h.dedup();
            h
        };
        let mut missing: Vec<(i64, Hash, &[f32])> = Vec::new();
        for (id, vectors) in &plan {
            let have = to.has_vectors(*id, &hashes)?;
            for (h, have) in hashes.iter().zip(have) {
                if let Some(v) = vectors.get(h) {
                    if have {
                        summary.vectors_present += 1;
                    } else {
                        missing.push((*id, *h, v));
                    }
                }
            }
        }
        to.write(|w| {
            for (id, h, v) in &missing {
                w.put_vector(*id, h, v)?;
            }
            for f in chunk {
                w.upsert_file(f)?;
            }
            Ok(())
        })?;
        summary.vectors += missing.len();
        summary.files += chunk.len();
        progress.inc(chunk.len() as u64);
    }
    progress.finish();
    // Verify.
    let there: std::collections::HashSet<String> =
        to.files_under(&[])?.into_iter().map(|f| f.path).collect();
    let lost = files.iter().filter(|f| !there.contains(&f.path)).count();
    if lost > 0 {
        return Err(Error::Report(format!(
            "{}: {lost} of {} files did not arrive",
            to.describe(),
            files.len()
        )));
    }
    for (id, vectors) in &plan {
        let hashes: Vec<Hash> = vectors.keys().copied().collect();
        let missing = to
            .has_vectors(*id, &hashes)?
            .iter()
            .filter(|h| !**h)
            .count();
        if missing > 0 {
            return Err(Error::Report(format!(
                "{}: {missing} of {} vectors of model {id} did not arrive",
                to.describe(),
                hashes.len()
            )));
        }
    }
    Ok(summary)
}
