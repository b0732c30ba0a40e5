//! The catalog: one SQLite database holding the files seen (path, size,
//! mtime, content hash, status), the models used, and the vectors, keyed by
//! (model, content hash) so a moved file or a copy is never embedded twice and
//! one store can serve several models.
//!
//! Every change is made inside a transaction; an interrupted run leaves the
//! database as of its last commit, and the next run carries on from there.

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};

use crate::{Error, Result};

pub type Hash = [u8; 32];

/// A catalogued file.
#[derive(Clone, Debug, PartialEq)]
pub struct FileRow {
    pub path: String,
    pub size: u64,
    pub mtime_ns: i64,
    pub hash: Option<Hash>,
    /// `None` when the file embeds; the reason when it does not.
    pub error: Option<String>,
    /// Text for hybrid search: sidecar caption, EXIF description, file name.
    pub caption: String,
}

pub struct Catalog {
    conn: Connection,
    path: PathBuf,
}

pub(crate) fn db_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Cache {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

fn hash_of(v: Option<Vec<u8>>) -> Option<Hash> {
    v.and_then(|b| b.try_into().ok())
}

impl Catalog {
    /// The default store: `$CLASP_STORE`, else the platform data dir.
    pub fn default_path() -> PathBuf {
        if let Some(p) = std::env::var_os("CLASP_STORE") {
            return PathBuf::from(p);
        }
        dirs::data_dir()
            .unwrap_or_else(std::env::temp_dir)
            .join("clasp")
            .join("index.sqlite")
    }

    /// Opens the store at `path`, refusing one that does not exist (only
    /// indexing creates a store, so a mistyped path is an error, not an
    /// empty store).
    pub fn open_existing(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::Report(format!(
                "{}: no such store; `clasp index DIR --store {}` makes one",
                path.display(),
                path.display()
            )));
        }
        Self::open(path)
    }

    /// Opens the store at `path`, creating it (and its folder) if needed.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let conn = Connection::open(path).map_err(|e| db_err(path, e))?;
        conn.busy_timeout(std::time::Duration::from_secs(30))
            .map_err(|e| db_err(path, e))?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous=NORMAL;
             PRAGMA foreign_keys=ON;
             CREATE TABLE IF NOT EXISTS files (
                 path TEXT PRIMARY KEY,
                 size INTEGER NOT NULL,
                 mtime_ns INTEGER NOT NULL,
                 hash BLOB,
                 error TEXT,
                 caption TEXT NOT NULL DEFAULT ''
             );
             CREATE INDEX IF NOT EXISTS files_hash ON files(hash);
             CREATE TABLE IF NOT EXISTS models (
                 id INTEGER PRIMARY KEY,
                 key BLOB NOT NULL UNIQUE,
                 spec TEXT NOT NULL,
                 dim INTEGER NOT NULL,
                 weights_path TEXT,
                 weights_size INTEGER,
                 weights_mtime_ns INTEGER,
                 last_used INTEGER NOT NULL DEFAULT 0
             );
             CREATE TABLE IF NOT EXISTS vectors (
                 model INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
                 hash BLOB NOT NULL,
                 vector BLOB NOT NULL,
                 PRIMARY KEY (model, hash)
             ) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
             CREATE VIRTUAL TABLE IF NOT EXISTS captions USING fts5(path UNINDEXED, text);",
        )
        .map_err(|e| db_err(path, e))?;
        Ok(Self {
            conn,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, e: impl std::fmt::Display) -> Error {
        db_err(&self.path, e)
    }

    /// A counter bumped by every change to files or vectors; search snapshots
    /// record it to know when they are stale.
    pub fn generation(&self) -> Result<i64> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = 'generation'", [], |r| {
                r.get(0)
            })
            .optional()
            .map(|v| v.unwrap_or(0))
            .map_err(|e| self.err(e))
    }

    /// Registers a model (by content hash) and returns its id.
    pub fn model_id(&self, key: &Hash, spec: &str, dim: usize) -> Result<i64> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        self.conn
            .execute(
                "INSERT INTO models (key, spec, dim, last_used) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(key) DO UPDATE SET spec = excluded.spec, last_used = excluded.last_used",
                params![&key[..], spec, dim as i64, now],
            )
            .map_err(|e| self.err(e))?;
        self.conn
            .query_row(
                "SELECT id FROM models WHERE key = ?1",
                params![&key[..]],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))
    }

    /// A model hash remembered for a weights file of this size and mtime, so
    /// a search need not re-hash hundreds of MB.
    pub fn remembered_model_key(
        &self,
        weights: &Path,
        size: u64,
        mtime_ns: i64,
    ) -> Result<Option<Hash>> {
        self.conn
            .query_row(
                "SELECT key FROM models WHERE weights_path = ?1 AND weights_size = ?2 AND weights_mtime_ns = ?3",
                params![weights.to_string_lossy(), size as i64, mtime_ns],
                |r| r.get::<_, Vec<u8>>(0),
            )
            .optional()
            .map(hash_of)
            .map_err(|e| self.err(e))
    }

    pub fn remember_model_file(
        &self,
        id: i64,
        weights: &Path,
        size: u64,
        mtime_ns: i64,
    ) -> Result<()> {
        self.conn
            .execute(
                "UPDATE models SET weights_path = ?2, weights_size = ?3, weights_mtime_ns = ?4 WHERE id = ?1",
                params![id, weights.to_string_lossy(), size as i64, mtime_ns],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Every model the store holds, by id.
    pub fn models(&self) -> Result<Vec<super::store::ModelRow>> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, key, spec, dim FROM models ORDER BY id")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })
            .map_err(|e| self.err(e))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e))?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, key, spec, dim)| {
                Some(super::store::ModelRow {
                    id,
                    key: hash_of(Some(key))?,
                    spec,
                    dim: dim as usize,
                })
            })
            .collect())
    }

    /// The most recently used model's spec, for searches without `--model`.
    pub fn last_model_spec(&self) -> Result<Option<String>> {
        self.conn
            .query_row(
                "SELECT spec FROM models ORDER BY last_used DESC, id DESC LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    fn row(r: &rusqlite::Row) -> rusqlite::Result<FileRow> {
        Ok(FileRow {
            path: r.get(0)?,
            size: r.get::<_, i64>(1)? as u64,
            mtime_ns: r.get(2)?,
            hash: hash_of(r.get(3)?),
            error: r.get(4)?,
            caption: r.get(5)?,
        })
    }

    /// Every file whose path starts with one of `prefixes` (all if empty).
    pub fn files_under(&self, prefixes: &[String]) -> Result<Vec<FileRow>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT path, size, mtime_ns, hash, error, caption FROM files ORDER BY path",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], Self::row)
            .map_err(|e| self.err(e))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e))?;
        Ok(rows
            .into_iter()
            .filter(|r| under_any(&r.path, prefixes))
            .collect())
    }

    /// Every file whose content hash is one of `hashes`, each content's
    /// files in path order (one indexed lookup each).
    pub fn files_with_hashes(&self, hashes: &[Hash]) -> Result<Vec<FileRow>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT path, size, mtime_ns, hash, error, caption FROM files WHERE hash = ?1
                 ORDER BY path",
            )
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for h in hashes {
            let rows = stmt
                .query_map([&h[..]], Self::row)
                .map_err(|e| self.err(e))?;
            for r in rows {
                out.push(r.map_err(|e| self.err(e))?);
            }
        }
        Ok(out)
    }

    /// The caption of the file at `path`, if the catalog has the file.
    pub fn caption_of(&self, path: &str) -> Result<Option<String>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT caption FROM files WHERE path = ?1")
            .map_err(|e| self.err(e))?;
        let mut rows = stmt.query([path]).map_err(|e| self.err(e))?;
        match rows.next().map_err(|e| self.err(e))? {
            Some(r) => Ok(Some(r.get(0).map_err(|e| self.err(e))?)),
            None => Ok(None),
        }
    }

    /// What describes the file at `path` for a person: its sidecar caption
    /// and EXIF description, i.e. its search text ([`Self::caption_of`])
    /// without the file-name words that end it. None when it has neither, or
    /// the catalog does not have the file.
    pub fn description_of(&self, path: &str) -> Result<Option<String>> {
        Ok(self.caption_of(path)?.and_then(|c| {
            let d = c.rsplit_once('\n').map_or("", |(head, _)| head).trim();
            (!d.is_empty()).then(|| d.to_string())
        }))
    }

    /// Which of `hashes` have a vector for `model`.
    pub fn has_vectors(&self, model: i64, hashes: &[Hash]) -> Result<Vec<bool>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT 1 FROM vectors WHERE model = ?1 AND hash = ?2")
            .map_err(|e| self.err(e))?;
        hashes
            .iter()
            .map(|h| stmt.exists(params![model, &h[..]]).map_err(|e| self.err(e)))
            .collect()
    }

    /// All vectors of a model whose hash belongs to an embeddable file, in
    /// hash order: (hash, vector).
    pub fn model_vectors(&self, model: i64) -> Result<Vec<(Hash, Vec<f32>)>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT v.hash, v.vector FROM vectors v
                 WHERE v.model = ?1 AND EXISTS (SELECT 1 FROM files f WHERE f.hash = v.hash AND f.error IS NULL)
                 ORDER BY v.hash",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![model], |r| {
                let h: Vec<u8> = r.get(0)?;
                let b: Vec<u8> = r.get(1)?;
                Ok((h, b))
            })
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (h, b) = row.map_err(|e| self.err(e))?;
            let Some(h) = hash_of(Some(h)) else { continue };
            out.push((h, bytes_to_f32(&b)));
        }
        Ok(out)
    }

    /// Runs `f` in one transaction, bumping the generation.
    pub fn write<T>(&mut self, f: impl FnOnce(&Writer) -> Result<T>) -> Result<T> {
        let path = self.path.clone();
        let tx = self.conn.transaction().map_err(|e| db_err(&path, e))?;
        let w = Writer {
            tx: &tx,
            path: &path,
        };
        let out = f(&w)?;
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('generation', 1)
             ON CONFLICT(key) DO UPDATE SET value = value + 1",
            [],
        )
        .map_err(|e| db_err(&path, e))?;
        tx.commit().map_err(|e| db_err(&path, e))?;
        Ok(out)
    }

    /// BM25 search over file captions (SQLite FTS5): (path, score), best first.
    pub fn text_search(&self, query: &str, limit: usize) -> Result<Vec<(String, f64)>> {
        let q = fts_query(query);
        if q.is_empty() {
            return Ok(Vec::new());
        }
        let mut stmt = self
            .conn
            .prepare_cached("SELECT path, bm25(captions) FROM captions WHERE captions MATCH ?1 ORDER BY bm25(captions) LIMIT ?2")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![q, limit as i64], |r| {
                Ok((r.get::<_, String>(0)?, -r.get::<_, f64>(1)?))
            })
            .map_err(|e| self.err(e))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e))?;
        Ok(rows)
    }

    /// Consistency check used by tests and `clasp index --check`: SQLite's
    /// integrity check, every embeddable file has a vector for `model`, and
    /// no vector is orphaned.
    pub fn check(&self, model: Option<i64>) -> Result<Vec<String>> {
        let mut problems = Vec::new();
        let ic: String = self
            .conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        if ic != "ok" {
            problems.push(format!("integrity_check: {ic}"));
        }
        let orphans: i64 = self
            .conn
            .query_row(
                "SELECT COUNT(*) FROM vectors v WHERE NOT EXISTS (SELECT 1 FROM files f WHERE f.hash = v.hash)",
                [],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))?;
        if orphans > 0 {
            problems.push(format!("{orphans} vectors belong to no file"));
        }
        if let Some(m) = model {
            let missing: i64 = self
                .conn
                .query_row(
                    "SELECT COUNT(*) FROM files f WHERE f.error IS NULL AND NOT EXISTS
                     (SELECT 1 FROM vectors v WHERE v.model = ?1 AND v.hash = f.hash)",
                    params![m],
                    |r| r.get(0),
                )
                .map_err(|e| self.err(e))?;
            if missing > 0 {
                problems.push(format!("{missing} files have no vector for this model"));
            }
        }
        let captions: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM captions", [], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        let files: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM files", [], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        if captions != files {
            problems.push(format!("{captions} caption rows for {files} files"));
        }
        Ok(problems)
    }
}

/// Writes inside one transaction.
pub struct Writer<'a> {
    tx: &'a rusqlite::Transaction<'a>,
    path: &'a Path,
}

impl Writer<'_> {
    fn err(&self, e: impl std::fmt::Display) -> Error {
        db_err(self.path, e)
    }

    pub fn upsert_file(&self, f: &FileRow) -> Result<()> {
        self.tx
            .execute(
                "INSERT INTO files (path, size, mtime_ns, hash, error, caption) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(path) DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns,
                   hash = excluded.hash, error = excluded.error, caption = excluded.caption",
                params![f.path, f.size as i64, f.mtime_ns, f.hash.as_ref().map(|h| &h[..]), f.error, f.caption],
            )
            .map_err(|e| self.err(e))?;
        self.tx
            .execute("DELETE FROM captions WHERE path = ?1", params![f.path])
            .map_err(|e| self.err(e))?;
        self.tx
            .execute(
                "INSERT INTO captions (path, text) VALUES (?1, ?2)",
                params![f.path, f.caption],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Renames a file's row (a move), keeping its hash and vectors.
    pub fn move_file(&self, from: &str, to: &FileRow) -> Result<()> {
        self.remove_file(from)?;
        self.upsert_file(to)
    }

    pub fn remove_file(&self, path: &str) -> Result<()> {
        self.tx
            .execute("DELETE FROM files WHERE path = ?1", params![path])
            .map_err(|e| self.err(e))?;
        self.tx
            .execute("DELETE FROM captions WHERE path = ?1", params![path])
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    pub fn put_vector(&self, model: i64, hash: &Hash, v: &[f32]) -> Result<()> {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.tx
            .execute(
                "INSERT OR REPLACE INTO vectors (model, hash, vector) VALUES (?1, ?2, ?3)",
                params![model, &hash[..], bytes],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Drops vectors whose content no file has any more.
    pub fn drop_orphan_vectors(&self) -> Result<usize> {
        self.tx
            .execute(
                "DELETE FROM vectors WHERE NOT EXISTS (SELECT 1 FROM files f WHERE f.hash = vectors.hash)",
                [],
            )
            .map_err(|e| self.err(e))
    }
}

pub(crate) fn bytes_to_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Whether `path` is `dir` or inside it (by path components, not string prefix).
pub fn under(path: &str, dir: &str) -> bool {
    Path::new(path).starts_with(Path::new(dir))
}

/// Whether `path` is one of `dirs` or under one of them; every path is when
/// `dirs` is empty.
pub fn under_any(path: &str, dirs: &[String]) -> bool {
    dirs.is_empty() || dirs.iter().any(|d| under(path, d))
}

/// Turns free text into an FTS5 query of OR-ed quoted terms, so punctuation
/// in user text is never FTS syntax.
fn fts_query(text: &str) -> String {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| format!("\"{}\"", w.to_lowercase()))
        .collect::<Vec<_>>()
        .join(" OR ")
}

#[cfg(test)]
#[path = "catalog_tests.rs"]
mod tests;
