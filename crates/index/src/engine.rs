//! Search engines over a model's vectors.
//!
//! The vectors are exported from the catalog into a snapshot file next to the
//! store (`<store>.m<model>.vecs`): a header, the content hash of each row,
//! then the row-major f32 matrix. Searches memory-map it, so a million
//! vectors cost no load time. The snapshot records the catalog generation it
//! was built from and is rebuilt when the catalog has changed.
//!
//! [`ExactIndex`] scans every row; [`AnnIndex`] (HNSW, usearch) is built
//! automatically above a size threshold. Both implement [`VectorSearch`], the
//! trait the search logic is written against, so another backend (Qdrant)
//! can stand in for them.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rayon::prelude::*;

use super::catalog::{Catalog, Hash};
pub use crate::vecmath::{dot, row_score};
use crate::{Error, Result};

/// Nearest-neighbour search by inner product over unit vectors.
pub trait VectorSearch: Send + Sync {
    /// Up to `k` (content hash, score) pairs, best first. `allow`, when
    /// given, restricts results to those hashes.
    fn search(
        &self,
        query: &[f32],
        k: usize,
        allow: Option<&HashSet<Hash>>,
    ) -> Result<Vec<(Hash, f32)>>;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn name(&self) -> &'static str;
    /// HNSW's candidate list size at query time; exact engines ignore it.
    fn set_ef_search(&self, _ef: usize) {}
    /// The parts of the store that did not answer the latest search, which
    /// is then partial: the shards of a sharded PostgreSQL store that were
    /// down when the store was opened with `allow_partial`. Empty when the
    /// latest search saw every vector.
    fn unanswered(&self) -> Vec<String> {
        Vec::new()
    }
}

const MAGIC: &[u8; 8] = b"CLASPVEC";
const HEADER: usize = 64;

/// The memory-mapped snapshot of one model's vectors.
pub struct Snapshot {
    map: Mmap,
    pub n: usize,
    pub dim: usize,
    pub generation: i64,
}

pub fn snapshot_path(store: &Path, model: i64) -> PathBuf {
    let mut s = store.as_os_str().to_owned();
    s.push(format!(".m{model}.vecs"));
    PathBuf::from(s)
}

impl Snapshot {
    /// Opens the snapshot, rebuilding it first if the catalog moved on.
    pub fn open(catalog: &Catalog, model: i64) -> Result<Self> {
        let path = snapshot_path(catalog.path(), model);
        let generation = catalog.generation()?;
        if let Ok(s) = Self::map(&path) {
            if s.generation == generation {
                return Ok(s);
            }
        }
        let rows = catalog.model_vectors(model)?;
        write_snapshot(&path, generation, &rows)?;
        Self::map(&path)
    }

    /// Maps a snapshot file as it is (benchmarks and tools).
    pub fn open_file(path: &Path) -> Result<Self> {
        Self::map(path)
    }

    fn map(path: &Path) -> Result<Self> {
        let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is only ever replaced by rename, never written in
        // place, so the mapping stays valid while it is open.
        let map = unsafe { Mmap::map(&f) }.map_err(|e| Error::io(path, e))?;
        let bad = || Error::Report(format!("{}: not a clasp vector snapshot", path.display()));
        if map.len() < HEADER || &map[..8] != MAGIC {
            return Err(bad());
        }
        let u = |o: usize| u64::from_le_bytes(map[o..o + 8].try_into().unwrap());
        let (generation, n, dim) = (u(8) as i64, u(16), u(24));
        // Checked: a header may claim any counts, and unchecked products wrap
        // (2^59 rows of width 8 would pass as a 64-byte file).
        let expect = dim
            .checked_add(8)
            .and_then(|row| n.checked_mul(row))
            .and_then(|x| x.checked_mul(4))
            .and_then(|x| x.checked_add(HEADER as u64));
        if expect != Some(map.len() as u64) {
            return Err(Error::Report(format!(
                "{}: not a clasp vector snapshot (its header claims {n} rows of width {dim}, \
                 which does not match the file's {} bytes)",
                path.display(),
                map.len()
            )));
        }
        // Both fit in usize now: their product is at most the file's length.
        let (n, dim) = (n as usize, dim as usize);
        Ok(Self {
            map,
            n,
            dim,
            generation,
        })
    }

    pub fn hash(&self, row: usize) -> Hash {
        let o = HEADER + row * 32;
        self.map[o..o + 32].try_into().unwrap()
    }

    pub fn matrix(&self) -> &[f32] {
        let o = HEADER + self.n * 32;
        // The mapping is page-aligned and `o` a multiple of 4, and `map`
        // checked the length; bytemuck checks both again.
        bytemuck::cast_slice(&self.map[o..o + self.n * self.dim * 4])
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.matrix()[i * self.dim..(i + 1) * self.dim]
    }
}

/// Writes a snapshot atomically (temporary file, then rename).
pub fn write_snapshot(path: &Path, generation: i64, rows: &[(Hash, Vec<f32>)]) -> Result<()> {
    let dim = rows.first().map(|r| r.1.len()).unwrap_or(0);
    // A name of its own: concurrent rebuilds after a store change each write
    // their own file, and the last rename wins with a complete snapshot.
    let tmp = crate::atomic::temp_beside(path);
    let written = (|| -> Result<()> {
        let io = |e| Error::io(&tmp, e);
        let mut w = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
        let mut header = [0u8; HEADER];
        header[..8].copy_from_slice(MAGIC);
        header[8..16].copy_from_slice(&(generation as u64).to_le_bytes());
        header[16..24].copy_from_slice(&(rows.len() as u64).to_le_bytes());
        header[24..32].copy_from_slice(&(dim as u64).to_le_bytes());
        w.write_all(&header).map_err(io)?;
        for (h, _) in rows {
            w.write_all(h).map_err(io)?;
        }
        for (_, v) in rows {
            if v.len() != dim {
                return Err(Error::Shape(format!(
                    "stored vectors of widths {dim} and {}",
                    v.len()
                )));
            }
            for x in v {
                w.write_all(&x.to_le_bytes()).map_err(io)?;
            }
        }
        w.into_inner()
            .map_err(|e| io(e.into_error()))?
            .sync_all()
            .map_err(io)?;
        Ok(())
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// A bounded best-k list (k is small, so insertion into a sorted Vec is fine).
struct TopK {
    k: usize,
    items: Vec<(f32, usize)>,
}

impl TopK {
    fn new(k: usize) -> Self {
        Self {
            k,
            items: Vec::with_capacity(k + 1),
        }
    }
    fn push(&mut self, score: f32, row: usize) {
        if self.items.len() == self.k
            && self.items.last().is_some_and(|l| !better((score, row), *l))
        {
            return;
        }
        let pos = self.items.partition_point(|x| better(*x, (score, row)));
        self.items.insert(pos, (score, row));
        self.items.truncate(self.k);
    }
}

/// Higher score first; equal scores by lower row.
fn better(a: (f32, usize), b: (f32, usize)) -> bool {
    a.0 > b.0 || (a.0 == b.0 && a.1 < b.1)
}

/// Exact search: every row scored.
pub struct ExactIndex {
    pub snap: Snapshot,
}

impl ExactIndex {
    /// Best `k` rows for `query`, optionally restricted to rows in `allow`.
    pub fn top_rows(&self, query: &[f32], k: usize, allow: Option<&[bool]>) -> Vec<(usize, f32)> {
        let dim = self.snap.dim;
        if k == 0 || self.snap.n == 0 {
            return Vec::new();
        }
        let m = self.snap.matrix();
        const CHUNK: usize = 4096;
        let partial: Vec<TopK> = m
            .par_chunks(CHUNK * dim)
            .enumerate()
            .map(|(c, block)| {
                let mut t = TopK::new(k);
                for (i, row) in block.chunks_exact(dim).enumerate() {
                    let r = c * CHUNK + i;
                    if allow.is_some_and(|a| !a[r]) {
                        continue;
                    }
                    t.push(row_score(row, query), r);
                }
                t
            })
            .collect();
        let mut all = TopK::new(k);
        for t in partial {
            for (s, r) in t.items {
                all.push(s, r);
            }
        }
        all.items.into_iter().map(|(s, r)| (r, s)).collect()
    }
}

impl VectorSearch for ExactIndex {
    fn search(
        &self,
        query: &[f32],
        k: usize,
        allow: Option<&HashSet<Hash>>,
    ) -> Result<Vec<(Hash, f32)>> {
        check_dim(query, self.snap.dim)?;
        let mask: Option<Vec<bool>> = allow.map(|a| {
            (0..self.snap.n)
                .map(|r| a.contains(&self.snap.hash(r)))
                .collect()
        });
        Ok(self
            .top_rows(query, k, mask.as_deref())
            .into_iter()
            .map(|(r, s)| (self.snap.hash(r), s))
            .collect())
    }
    fn len(&self) -> usize {
        self.snap.n
    }
    fn name(&self) -> &'static str {
        "exact"
    }
}

/// A query fits rows of its own width, or rows of several vectors of its
/// width (a multi-vector model's: BLIP-2 keeps N query embeddings per image
/// and scores the best; see [`row_score`]).
pub fn check_dim(query: &[f32], dim: usize) -> Result<()> {
    if query.is_empty() || !dim.is_multiple_of(query.len()) {
        return Err(Error::Shape(format!(
            "query has {} dimensions, the stored vectors {dim}",
            query.len()
        )));
    }
    Ok(())
}

/// Approximate search with an HNSW graph (usearch), built from the snapshot
/// and saved beside it.
pub struct AnnIndex {
    index: usearch::Index,
    snap: Snapshot,
}

pub fn ann_path(store: &Path, model: i64, generation: i64) -> PathBuf {
    let mut s = store.as_os_str().to_owned();
    s.push(format!(".m{model}.g{generation}.hnsw"));
    PathBuf::from(s)
}

fn uerr(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Report(format!("{}: HNSW index: {e}", path.display()))
}

impl AnnIndex {
    /// Loads the HNSW graph for the snapshot's generation, building it (and
    /// removing older ones) when absent.
    pub fn open(store: &Path, model: i64, snap: Snapshot) -> Result<Self> {
        let path = ann_path(store, model, snap.generation);
        let opts = usearch::IndexOptions {
            dimensions: snap.dim,
            metric: usearch::MetricKind::IP,
            quantization: usearch::ScalarKind::F32,
            connectivity: 16,
            expansion_add: 128,
            expansion_search: 256,
            multi: false,
        };
        let p = path.to_string_lossy().into_owned();
        if path.is_file() {
            let index = usearch::Index::new(&opts).map_err(|e| uerr(&path, e))?;
            index.view(&p).map_err(|e| uerr(&path, e))?;
            if index.size() == snap.n {
                return Ok(Self { index, snap });
            }
        }
        let index = usearch::Index::new(&opts).map_err(|e| uerr(&path, e))?;
        index
            .reserve_capacity_and_threads(snap.n, rayon::current_num_threads())
            .map_err(|e| uerr(&path, e))?;
        (0..snap.n)
            .into_par_iter()
            .try_for_each(|r| index.add(r as u64, snap.row(r)).map_err(|e| uerr(&path, e)))?;
        let tmp = crate::atomic::temp_beside(&path);
        index
            .save(&tmp.to_string_lossy())
            .map_err(|e| uerr(&path, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        // Older generations' graphs are stale now.
        if let (Some(dir), Some(name)) = (path.parent(), store.file_name()) {
            let prefix = format!("{}.m{model}.g", name.to_string_lossy());
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with(&prefix) && n.ends_with(".hnsw") && e.path() != path {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        // Measure what the graph costs in recall: up to 100 stored vectors as
        // queries, top 10 against exact search.
        let built = Self { index, snap };
        let exact = ExactIndex {
            snap: Snapshot::open_file(&snapshot_path(store, model))?,
        };
        let step = (built.snap.n / 100).max(1);
        let queries: Vec<Vec<f32>> = (0..built.snap.n)
            .step_by(step)
            .take(100)
            .map(|r| built.snap.row(r).to_vec())
            .collect();
        let recall = ann_recall(&exact, &built, &queries, 10)?;
        tracing::info!(
            vectors = built.snap.n,
            recall_at_10 = recall,
            "built the HNSW index"
        );
        Ok(built)
    }

    pub fn set_expansion(&self, ef: usize) {
        self.index.change_expansion_search(ef);
    }

    pub fn top_rows(&self, query: &[f32], k: usize) -> Result<Vec<(usize, f32)>> {
        rows_of(self.index.search(query, k))
    }
}

/// (row, inner product) pairs of a usearch answer (its IP distance is 1 − dot).
fn rows_of<E: std::fmt::Display>(
    m: std::result::Result<usearch::ffi::Matches, E>,
) -> Result<Vec<(usize, f32)>> {
    let m = m.map_err(|e| Error::Report(format!("HNSW search: {e}")))?;
    Ok(m.keys
        .iter()
        .zip(&m.distances)
        .map(|(&key, &d)| (key as usize, 1.0 - d))
        .collect())
}

impl VectorSearch for AnnIndex {
    fn search(
        &self,
        query: &[f32],
        k: usize,
        allow: Option<&HashSet<Hash>>,
    ) -> Result<Vec<(Hash, f32)>> {
        check_dim(query, self.snap.dim)?;
        if query.len() != self.snap.dim {
            return Err(Error::Report(format!(
                "the HNSW index holds one vector per image, this model's rows {} of width {}: \
                 a multi-vector model (BLIP-2) is searched exactly",
                self.snap.dim / query.len(),
                query.len()
            )));
        }
        let rows = match allow {
            None => self.top_rows(query, k)?,
            Some(a) => {
                let snap = &self.snap;
                rows_of(
                    self.index
                        .filtered_search(query, k, |key: u64| a.contains(&snap.hash(key as usize))),
                )?
            }
        };
        Ok(rows
            .into_iter()
            .map(|(r, s)| (self.snap.hash(r), s))
            .collect())
    }
    fn len(&self) -> usize {
        self.snap.n
    }
    fn name(&self) -> &'static str {
        "hnsw"
    }
    fn set_ef_search(&self, ef: usize) {
        self.set_expansion(ef);
    }
}

/// Recall@k of `ann` against exact search over `queries`.
pub fn ann_recall(
    exact: &ExactIndex,
    ann: &AnnIndex,
    queries: &[Vec<f32>],
    k: usize,
) -> Result<f64> {
    let mut hit = 0usize;
    let mut total = 0usize;
    for q in queries {
        let truth: HashSet<usize> = exact
            .top_rows(q, k, None)
            .into_iter()
            .map(|x| x.0)
            .collect();
        let got = ann.top_rows(q, k)?;
        hit += got.iter().filter(|(r, _)| truth.contains(r)).count();
        total += truth.len();
    }
    Ok(hit as f64 / total.max(1) as f64)
}

/// The engine for a model: exact below `ann_threshold` vectors, HNSW above.
pub fn open_engine(
    catalog: &Catalog,
    model: i64,
    ann_threshold: usize,
) -> Result<Box<dyn VectorSearch>> {
    let snap = Snapshot::open(catalog, model)?;
    if snap.n >= ann_threshold && snap.n > 0 {
        Ok(Box::new(AnnIndex::open(catalog.path(), model, snap)?))
    } else {
        Ok(Box::new(ExactIndex { snap }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 64-byte snapshot whose header claims 2^59 rows of width 8: the
    /// unchecked size `64 + n*32 + n*dim*4` wraps to 64 in 64-bit arithmetic,
    /// so the file once passed and `matrix()` built a slice of 2^62 floats.
    /// Opened as a file it is refused by name; beside a store it is rebuilt
    /// from the catalog, whose one vector then reads back.
    #[test]
    fn a_snapshot_whose_header_overflows_is_refused_or_rebuilt() {
        let d = tempfile::tempdir().unwrap();
        let mut cat = Catalog::open(&d.path().join("s.sqlite")).unwrap();
        let id = cat.model_id(&[1u8; 32], "test", 8).unwrap();
        let v: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let file = crate::catalog::FileRow {
            path: "/a.jpg".into(),
            size: 1,
            mtime_ns: 0,
            hash: Some([2u8; 32]),
            error: None,
            caption: String::new(),
        };
        cat.write(|w| {
            w.upsert_file(&file)?;
            w.put_vector(id, &[2u8; 32], &v)
        })
        .unwrap();
        let path = snapshot_path(cat.path(), id);
        let mut bytes = Vec::new();
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&cat.generation().unwrap().to_le_bytes());
        bytes.extend_from_slice(&(1u64 << 59).to_le_bytes());
        bytes.extend_from_slice(&8u64.to_le_bytes());
        bytes.resize(HEADER, 0);
        assert_eq!(
            (HEADER as u64).wrapping_add((1u64 << 59).wrapping_mul(32 + 8 * 4)),
            HEADER as u64,
            "the unchecked size wraps to the header's"
        );
        std::fs::write(&path, &bytes).unwrap();
        let err = Snapshot::open_file(&path)
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("576460752303423488 rows"), "{err}");
        let snap = Snapshot::open(&cat, id).unwrap();
        assert_eq!((snap.n, snap.dim), (1, 8));
        assert_eq!(snap.row(0), &v[..]);
        assert_eq!(snap.hash(0), [2u8; 32]);
    }

    #[test]
    fn exact_topk_matches_sorting_and_respects_masks() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.vecs");
        let mut rows = Vec::new();
        let mut seed = 1u64;
        for i in 0..10_000u32 {
            let v: Vec<f32> = (0..20)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
                })
                .collect();
            let mut h = [0u8; 32];
            h[..4].copy_from_slice(&i.to_le_bytes());
            rows.push((h, v));
        }
        write_snapshot(&p, 7, &rows).unwrap();
        let snap = Snapshot::map(&p).unwrap();
        assert_eq!((snap.n, snap.dim, snap.generation), (10_000, 20, 7));
        let q = rows[17].1.clone();
        let ex = ExactIndex { snap };
        let mut brute: Vec<(usize, f32)> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| (i, dot(&r.1, &q)))
            .collect();
        brute.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        assert_eq!(ex.top_rows(&q, 10, None), brute[..10].to_vec());
        let mask: Vec<bool> = (0..10_000).map(|i| i % 2 == 1).collect();
        let odd: Vec<_> = brute
            .iter()
            .filter(|x| x.0 % 2 == 1)
            .take(5)
            .copied()
            .collect();
        assert_eq!(ex.top_rows(&q, 5, Some(&mask)), odd);
    }
}
