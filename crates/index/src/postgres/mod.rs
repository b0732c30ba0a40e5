//! The PostgreSQL store: the catalog and the vectors in PostgreSQL, searched
//! by pgvector on the server.
//!
//! Tables (all prefixed `clasp_`):
//! - `clasp_files`: path, size, mtime, BLAKE3 hash, error, caption, and the
//!   caption's `tsvector` (generated) for full-text search;
//! - `clasp_models`: one row per model (content hash, spec, width);
//! - `clasp_vectors_<id>`: one table per model, (hash, embedding
//!   `vector(dim)`), with an HNSW index (`vector_cosine_ops`). One table per
//!   model because an HNSW index needs one width; the name is made from the
//!   model's integer id, never from user text;
//! - `clasp_meta`: the generation counter.
//!
//! The client is the `postgres` crate: tokio-postgres's own blocking
//! wrapper. The store's users (indexing, the CLI, the server's blocking
//! tasks) are synchronous, and the wrapper keeps one small runtime per
//! connection out of their way. Every statement is parameterised; only
//! integer ids and widths are ever formatted into SQL. TLS is negotiated
//! with rustls when the URL asks (`sslmode=prefer|require|verify-full`),
//! always verifying the server's certificate and name, against the URL's
//! `sslrootcert` PEM file (or `PGSSLROOTCERT`) when given, else Mozilla's
//! roots.
//!
//! Several writers: every write transaction first bumps the generation row,
//! so write transactions run one at a time and each sees the others'
//! commits; embedding happens outside them. Content is claimed with
//! session advisory locks ([`Store::claim`]) before it is embedded, so
//! overlapping runs embed each content once, and a killed writer's claims
//! end with its connection.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use pgvector::Vector;
use postgres::{Client, Config, Transaction};

use super::catalog::{under_any, FileRow, Hash};
use super::engine::VectorSearch;
use super::store::{ConnectOptions, ModelRow, Store, StoreWriter, VectorType};
use crate::{Error, Result};

mod connect;
pub use connect::*;
mod schema;
use schema::*;
mod writer;
use writer::*;
mod search;
mod store;
pub use search::*;

/// A PostgreSQL store.
pub struct PgStore {
    client: Client,
    shown: String,
    config: Target,
    opts: ConnectOptions,
}

/// A `clasp_files` row selected as (path, size, mtime_ns, hash, error, caption).
fn file_row(r: &postgres::Row) -> FileRow {
    FileRow {
        path: r.get(0),
        size: r.get::<_, i64>(1) as u64,
        mtime_ns: r.get(2),
        hash: r.get::<_, Option<&[u8]>>(3).and_then(hash_of),
        error: r.get(4),
        caption: r.get(5),
    }
}

fn hash_of(b: &[u8]) -> Option<Hash> {
    b.try_into().ok()
}

/// The advisory-lock key of a content hash: its first 8 bytes.
fn lock_key(h: &Hash) -> i64 {
    i64::from_le_bytes(h[..8].try_into().expect("8 bytes"))
}

/// The table of model `id`'s vectors (an integer id: never user text).
fn vectors_table(id: i64) -> String {
    format!("clasp_vectors_{id}")
}

/// Vectors stored inline in the row, never compressed or moved out of line
/// (TOAST), while a row still fits a page: an exact scan then reads them
/// straight from the heap (pgvector's advice), several times faster.
fn storage(dim: usize) -> &'static str {
    if dim * 4 + 64 < 8000 {
        "STORAGE PLAIN"
    } else {
        ""
    }
}

/// An arbitrary fixed key for the schema lock.
const SCHEMA_LOCK: i64 = 0x636c_6173_7073_6368;

/// `maintenance_work_mem` for building an HNSW index over `n` vectors of
/// `dim` floats: pgvector builds fast only while the whole graph fits in
/// it (about the vectors plus their neighbour lists), and falls back to a
/// far slower on-disk build when it does not. At least 1 GB, at most 8 GB.
fn build_memory_mb(n: i64, dim: usize, vtype: VectorType) -> i64 {
    let width = match vtype {
        VectorType::Vector => 4,
        VectorType::Halfvec => 2,
    };
    let bytes = n.max(0) as f64 * (dim * width + 512) as f64 * 1.25;
    ((bytes / (1 << 20) as f64).ceil() as i64).clamp(1024, 8192)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_passwords() {
        assert_eq!(
            redact("postgres://clasp:secret@127.0.0.1:5432/db"),
            "postgres://clasp@127.0.0.1:5432/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("postgres://h/db"), "postgres://h/db");
    }

    #[test]
    fn libpq_tls_parameters_are_taken_out_of_the_url() {
        // URL form: sslrootcert (percent-decoded) comes out, verify-full
        // becomes require, everything else stays in its order.
        let (url, root) = split_tls_params(
            "postgres://u@h/db?application_name=x&sslmode=verify-full&sslrootcert=%2Ftmp%2Fmy%20ca.pem&connect_timeout=3",
        );
        assert_eq!(
            url,
            "postgres://u@h/db?application_name=x&sslmode=require&connect_timeout=3"
        );
        assert_eq!(root.as_deref(), Some("/tmp/my ca.pem"));
        let (url, root) = split_tls_params("postgres://u@h/db?sslrootcert=/ca.pem");
        assert_eq!(
            (url.as_str(), root.as_deref()),
            ("postgres://u@h/db", Some("/ca.pem"))
        );
        // key=value form.
        let (url, root) = split_tls_params("host=h dbname=d sslmode=verify-ca sslrootcert=/ca.pem");
        assert_eq!(url, "host=h dbname=d sslmode=require");
        assert_eq!(root.as_deref(), Some("/ca.pem"));
        // Parsed by tokio-postgres afterwards.
        assert!(url.parse::<Config>().is_ok());
    }
}
