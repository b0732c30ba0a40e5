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

/// A PostgreSQL store.
pub struct PgStore {
    client: Client,
    shown: String,
    config: Target,
    opts: ConnectOptions,
}

/// The URL without its password, for messages and logs.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (auth, host) = match rest.rsplit_once('@') {
        Some((a, h)) => (Some(a), h),
        None => (None, rest),
    };
    match auth {
        Some(a) => {
            let user = a.split(':').next().unwrap_or("");
            format!("{scheme}://{user}@{host}")
        }
        None => url.to_string(),
    }
}

fn pg_err(shown: &str, e: postgres::Error) -> Error {
    let reason = match e.as_db_error() {
        Some(db) => {
            let mut r = db.message().to_string();
            if let Some(d) = db.detail() {
                r.push_str(&format!(" ({d})"));
            }
            if db.code() == &postgres::error::SqlState::INVALID_PASSWORD
                || db.code() == &postgres::error::SqlState::INVALID_AUTHORIZATION_SPECIFICATION
            {
                r.push_str(
                    "; the password comes from the URL (postgres://USER:PASSWORD@...), \
                     PGPASSWORD or ~/.pgpass",
                );
            }
            r
        }
        None => {
            let mut r = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                r.push_str(&format!(": {s}"));
                src = s.source();
            }
            if e.is_closed() || r.contains("onnection refused") {
                r.push_str(" (is the server running?)");
            } else if r.contains("onnection reset")
                || r.contains("roken pipe")
                || r.contains("unexpected EOF")
            {
                // A server that stops mid-query may close the socket before
                // its "terminating connection" notice is read.
                r.push_str(" (the server dropped the connection: is the server running?)");
            } else if r.contains("certificate") || r.contains("UnknownIssuer") {
                r.push_str(
                    " (the server's TLS certificate is not trusted: give its CA as \
                     sslrootcert=PATH.pem in the URL, or PGSSLROOTCERT)",
                );
            } else if r.contains("does not support TLS") {
                r.push_str(" (sslmode=require asks for TLS, which this server does not offer)");
            }
            r
        }
    };
    Error::Report(format!("{shown}: {reason}"))
}

/// The password for `cfg` from ~/.pgpass (host:port:database:user:password,
/// `*` matching anything), as libpq reads it.
fn pgpass_password(cfg: &Config) -> Option<String> {
    let path = std::env::var_os("PGPASSFILE")
        .map(std::path::PathBuf::from)
        .or_else(|| dirs::home_dir().map(|h| h.join(".pgpass")))?;
    let text = std::fs::read_to_string(path).ok()?;
    let host = match cfg.get_hosts().first() {
        Some(postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "localhost".to_string(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432).to_string();
    let db = cfg.get_dbname().unwrap_or("").to_string();
    let user = cfg.get_user().unwrap_or("").to_string();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.splitn(5, ':').collect();
        if f.len() == 5
            && [&host, &port, &db, &user]
                .iter()
                .zip(&f)
                .all(|(want, got)| *got == "*" || got == want)
        {
            return Some(f[4].to_string());
        }
    }
    None
}

/// A parsed connection target: tokio-postgres's config, and the TLS
/// connector for it (the server's certificate is checked against
/// `sslrootcert` when given, else Mozilla's roots).
#[derive(Clone)]
struct Target {
    cfg: Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
}

/// Takes out of `url` what tokio-postgres does not parse itself: libpq's
/// `sslrootcert` (or `PGSSLROOTCERT`), and `sslmode=verify-ca|verify-full`,
/// which become `require` (rustls always verifies the certificate and the
/// host name, so `require` here is libpq's `verify-full`). Handles the URL
/// form (`postgres://...?a=b&c=d`) and the key=value form.
fn split_tls_params(url: &str) -> (String, Option<String>) {
    let mut root = None;
    let mut keep = |k: &str, v: &str| -> Option<String> {
        match (k, v) {
            ("sslrootcert", v) => {
                root = Some(v.to_string());
                None
            }
            ("sslmode", "verify-ca" | "verify-full") => Some(format!("{k}=require")),
            _ => Some(format!("{k}={v}")),
        }
    };
    let out = if url.contains("://") {
        match url.split_once('?') {
            Some((base, query)) => {
                let params: Vec<String> = query
                    .split('&')
                    .filter(|p| !p.is_empty())
                    .filter_map(|p| {
                        let (k, v) = p.split_once('=').unwrap_or((p, ""));
                        let v = percent_encoding::percent_decode_str(v).decode_utf8_lossy();
                        if k == "sslrootcert" || k == "sslmode" {
                            keep(k, &v)
                        } else {
                            Some(p.to_string())
                        }
                    })
                    .collect();
                if params.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", params.join("&"))
                }
            }
            None => url.to_string(),
        }
    } else {
        url.split_whitespace()
            .filter_map(|p| match p.split_once('=') {
                Some((k @ ("sslrootcert" | "sslmode"), v)) => keep(k, v),
                _ => Some(p.to_string()),
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let root = root.or_else(|| std::env::var("PGSSLROOTCERT").ok());
    (out, root.filter(|r| !r.is_empty()))
}

/// The TLS connector: the certificates in `root_cert` (a PEM file) as the
/// only trusted roots when given (libpq's `sslrootcert`), else Mozilla's.
fn tls(root_cert: Option<&str>, shown: &str) -> Result<tokio_postgres_rustls::MakeRustlsConnect> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    match root_cert {
        Some(path) => {
            let bad = |why: String| Error::Report(format!("{shown}: sslrootcert {path}: {why}"));
            let certs: Vec<CertificateDer> = CertificateDer::pem_file_iter(path)
                .map_err(|e| bad(e.to_string()))?
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| bad(e.to_string()))?;
            if certs.is_empty() {
                return Err(bad("no PEM certificates in the file".into()));
            }
            for c in certs {
                roots.add(c).map_err(|e| bad(e.to_string()))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("rustls's default protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// Parses `url` into a connection target with the password, timeouts,
/// keepalives and TLS roots set.
fn config(url: &str, timeout: Duration) -> Result<Target> {
    let shown = redact(url);
    let (url, root_cert) = split_tls_params(url);
    let mut cfg: Config = url
        .parse()
        .map_err(|e| Error::Report(format!("{shown}: not a PostgreSQL URL: {e}")))?;
    if cfg.get_password().is_none() {
        if let Some(p) = std::env::var("PGPASSWORD")
            .ok()
            .or_else(|| pgpass_password(&cfg))
        {
            cfg.password(p);
        }
    }
    cfg.connect_timeout(timeout);
    cfg.keepalives(true);
    cfg.keepalives_idle(Duration::from_secs(10));
    cfg.options(&format!("-c statement_timeout={}", timeout.as_millis()));
    cfg.application_name("clasp");
    let tls = tls(root_cert.as_deref(), &shown)?;
    Ok(Target { cfg, tls })
}

fn connect_config(t: &Target, shown: &str) -> Result<Client> {
    t.cfg.connect(t.tls.clone()).map_err(|e| pg_err(shown, e))
}

/// An error of shard `server` (foreign server name) at `shown` (its
/// redacted URL), naming both.
fn shard_err(server: &str, shown: &str, e: postgres::Error) -> Error {
    Error::Report(format!("shard {server} ({shown}): {}", pg_err(shown, e)))
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

impl PgStore {
    /// Builds model `model`'s HNSW index (`vector_cosine_ops`) if it has
    /// none: on the table itself, or, for a sharded model, on every shard
    /// at once (each shard builds its own partition's index, in parallel,
    /// through dblink). Loading is faster without an index to maintain, so
    /// it is made at the first search that wants it; once built,
    /// PostgreSQL keeps it up to date on every insert.
    fn ensure_hnsw(&mut self, model: i64, dim: usize, vtype: VectorType) -> Result<()> {
        let t = vectors_table(model);
        let shown = self.shown.clone();
        let kind: Option<String> = self
            .client
            .query_opt(
                "SELECT relkind::text FROM pg_class WHERE oid = to_regclass($1)",
                &[&t],
            )
            .map_err(|e| pg_err(&shown, e))?
            .map(|r| r.get(0));
        let vsql = vtype.sql();
        match kind.as_deref() {
            Some("r") => {
                let has: bool = self
                    .client
                    .query_one(
                        "SELECT to_regclass($1) IS NOT NULL",
                        &[&format!("{t}_hnsw")],
                    )
                    .map_err(|e| pg_err(&shown, e))?
                    .get(0);
                if has {
                    return Ok(());
                }
                let n: i64 = self
                    .client
                    .query_one(&format!("SELECT COUNT(*) FROM {t}"), &[])
                    .map_err(|e| pg_err(&shown, e))?
                    .get(0);
                let mb = build_memory_mb(n, dim, vtype);
                tracing::info!(table = %t, vectors = n, "building the HNSW index");
                let mut tx = self.client.transaction().map_err(|e| pg_err(&shown, e))?;
                tx.batch_execute(&format!(
                    "SET LOCAL maintenance_work_mem = '{mb}MB';
                     SET LOCAL statement_timeout = 0;
                     CREATE INDEX IF NOT EXISTS {t}_hnsw ON {t} USING hnsw (embedding {vsql}_cosine_ops);"
                ))
                .map_err(|e| pg_err(&shown, e))?;
                tx.commit().map_err(|e| pg_err(&shown, e))
            }
            Some("p") => {
                let shards: Vec<(String, String)> = self
                    .client
                    .query("SELECT server, shown FROM clasp_shards ORDER BY idx", &[])
                    .map_err(|e| pg_err(&shown, e))?
                    .iter()
                    .map(|r| (r.get(0), r.get(1)))
                    .collect();
                let mut tx = self.client.transaction().map_err(|e| pg_err(&shown, e))?;
                tx.batch_execute("SET LOCAL statement_timeout = 0")
                    .map_err(|e| pg_err(&shown, e))?;
                let mut building = Vec::new();
                for (i, (server, shard)) in shards.iter().enumerate() {
                    let part = format!("{t}_p{i}");
                    let conn = format!("clasp_build{i}");
                    let shard_err = |e| shard_err(server, shard, e);
                    // In a savepoint, so a shard that is down leaves the
                    // transaction usable.
                    let connected = tx.savepoint("clasp_connect").and_then(|mut sp| {
                        sp.execute("SELECT dblink_connect($1, $2)", &[&conn, server])?;
                        sp.commit()
                    });
                    if let Err(e) = connected {
                        // A shard that is down builds its index at a later search.
                        if self.opts.allow_partial {
                            tracing::warn!("{}; not indexed now", shard_err(e));
                            continue;
                        }
                        return Err(shard_err(e));
                    }
                    let has: bool = tx
                        .query_one(
                            "SELECT b FROM dblink($1, format('SELECT to_regclass(%L) IS NOT NULL', $2::text)) AS t(b bool)",
                            &[&conn, &format!("{part}_hnsw")],
                        )
                        .map_err(shard_err)?
                        .get(0);
                    if !has {
                        let n: i64 = tx
                            .query_one(
                                &format!("SELECT n FROM dblink($1, 'SELECT COUNT(*) FROM {part}') AS t(n int8)"),
                                &[&conn],
                            )
                            .map_err(shard_err)?
                            .get(0);
                        let mb = build_memory_mb(n, dim, vtype);
                        tracing::info!(shard = %server, vectors = n, "building the shard's HNSW index");
                        let sql = format!(
                            "SET maintenance_work_mem = '{mb}MB'; SET statement_timeout = 0;
                             CREATE INDEX IF NOT EXISTS {part}_hnsw ON {part} USING hnsw (embedding {vsql}_cosine_ops)"
                        );
                        tx.execute("SELECT dblink_send_query($1, $2)", &[&conn, &sql])
                            .map_err(shard_err)?;
                    }
                    building.push((conn, server, shard, has));
                }
                // The shards build at the same time; collect each result.
                for (conn, server, shard, has) in &building {
                    let shard_err = |e| shard_err(server, shard, e);
                    // One status row per statement sent, then an empty
                    // result at the end.
                    if !has {
                        while !tx
                            .query("SELECT * FROM dblink_get_result($1) AS t(s text)", &[conn])
                            .map_err(shard_err)?
                            .is_empty()
                        {}
                    }
                    tx.execute("SELECT dblink_disconnect($1)", &[conn])
                        .map_err(shard_err)?;
                }
                tx.commit().map_err(|e| pg_err(&shown, e))
            }
            _ => Ok(()), // missing
        }
    }

    /// Connects, checks that pgvector is there, and makes the tables when
    /// missing.
    pub fn connect(url: &str, opts: &ConnectOptions) -> Result<Self> {
        let shown = redact(url);
        let cfg = config(url, opts.timeout)?;
        let mut client = connect_config(&cfg, &shown)?;
        let has_vector: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'vector')",
                &[],
            )
            .map_err(|e| pg_err(&shown, e))?
            .get(0);
        if !has_vector {
            return Err(Error::Report(format!(
                "{shown}: the server has no pgvector extension (`vector`); install pgvector \
                 there, or use scripts/postgres.sh's server"
            )));
        }
        // Two first runs at once must not race on CREATE ... IF NOT EXISTS.
        let mut tx = client.transaction().map_err(|e| pg_err(&shown, e))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
            .map_err(|e| pg_err(&shown, e))?;
        tx.batch_execute(
            "CREATE EXTENSION IF NOT EXISTS vector;
             CREATE TABLE IF NOT EXISTS clasp_files (
                 path TEXT PRIMARY KEY,
                 size BIGINT NOT NULL,
                 mtime_ns BIGINT NOT NULL,
                 hash BYTEA,
                 error TEXT,
                 caption TEXT NOT NULL DEFAULT '',
                 caption_tsv tsvector GENERATED ALWAYS AS (to_tsvector('simple', caption)) STORED
             );
             CREATE INDEX IF NOT EXISTS clasp_files_hash ON clasp_files (hash);
             CREATE INDEX IF NOT EXISTS clasp_files_tsv ON clasp_files USING gin (caption_tsv);
             CREATE TABLE IF NOT EXISTS clasp_models (
                 id BIGSERIAL PRIMARY KEY,
                 key BYTEA NOT NULL UNIQUE,
                 spec TEXT NOT NULL,
                 dim INTEGER NOT NULL,
                 weights_path TEXT,
                 weights_size BIGINT,
                 weights_mtime_ns BIGINT,
                 last_used BIGINT NOT NULL DEFAULT 0
             );
             ALTER TABLE clasp_models ADD COLUMN IF NOT EXISTS vtype TEXT NOT NULL DEFAULT 'vector';
             CREATE TABLE IF NOT EXISTS clasp_meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL);
             CREATE TABLE IF NOT EXISTS clasp_shards (
                 idx INTEGER PRIMARY KEY,
                 server TEXT NOT NULL UNIQUE,
                 shown TEXT NOT NULL
             );
             INSERT INTO clasp_meta (key, value) VALUES ('generation', 0) ON CONFLICT DO NOTHING;",
        )
        .map_err(|e| pg_err(&shown, e))?;
        tx.commit().map_err(|e| pg_err(&shown, e))?;
        Ok(Self {
            client,
            shown,
            config: cfg,
            opts: opts.clone(),
        })
    }

    /// A model's vector width and column type.
    fn column(&mut self, model: i64) -> Result<(usize, VectorType)> {
        let row = self
            .client
            .query_opt(
                "SELECT dim, vtype FROM clasp_models WHERE id = $1",
                &[&model],
            )
            .map_err(|e| pg_err(&self.shown, e))?;
        match row {
            Some(r) => Ok((
                r.get::<_, i32>(0) as usize,
                VectorType::parse(r.get(1)).unwrap_or_default(),
            )),
            None => Err(Error::Report(format!(
                "{}: no model with id {model}",
                self.shown
            ))),
        }
    }
}

/// Makes model table `t` hash-partitioned over the shards: on each shard
/// (through dblink and the shard's foreign server, so clasp keeps no shard
/// password of its own) a plain table, which gets its own HNSW index at the
/// first search that wants one (`ensure_hnsw`); on the
/// coordinator a `postgres_fdw` foreign table per shard as the partition.
fn create_sharded(
    tx: &mut Transaction,
    t: &str,
    vtype: &str,
    dim: usize,
    shards: &[String],
) -> std::result::Result<(), postgres::Error> {
    let n = shards.len();
    let storage = storage(dim);
    tx.batch_execute(&format!(
        "CREATE TABLE {t} (hash BYTEA NOT NULL, embedding {vtype}({dim}) NOT NULL) PARTITION BY HASH (hash);"
    ))?;
    for (i, server) in shards.iter().enumerate() {
        let part = format!("{t}_p{i}");
        let remote = format!(
            "CREATE EXTENSION IF NOT EXISTS vector;
             CREATE TABLE IF NOT EXISTS {part} (hash BYTEA PRIMARY KEY, embedding {vtype}({dim}) {storage} NOT NULL);"
        );
        tx.execute("SELECT dblink_exec($1, $2)", &[server, &remote])?;
        // The server name is clasp's own (clasp_shard_<i>), quoted anyway.
        let ddl: String = tx
            .query_one(
                "SELECT format('CREATE FOREIGN TABLE %I PARTITION OF %I
                   FOR VALUES WITH (MODULUS %s, REMAINDER %s) SERVER %I
                   OPTIONS (table_name %L)', $1::text, $2::text, $3::int, $4::int, $5::text, $1::text)",
                &[&part, &t, &(n as i32), &(i as i32), server],
            )?
            .get(0);
        tx.batch_execute(&ddl)?;
    }
    Ok(())
}

impl PgStore {
    /// Makes this store the coordinator of `shards` (PostgreSQL URLs, each
    /// with its password if the server needs one): a `postgres_fdw` foreign
    /// server and user mapping per shard. Every model's vectors are then
    /// hash-partitioned over them. Only a store without models can be
    /// sharded (its vectors would have to move).
    pub fn init_shards(&mut self, shards: &[String]) -> Result<()> {
        let shown = self.shown.clone();
        if shards.len() < 2 {
            return Err(Error::Report(format!(
                "{shown}: sharding needs at least two --shard URLs"
            )));
        }
        let mut tx = self.client.transaction().map_err(|e| pg_err(&shown, e))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
            .map_err(|e| pg_err(&shown, e))?;
        let models: i64 = tx
            .query_one("SELECT COUNT(*) FROM clasp_models", &[])
            .map_err(|e| pg_err(&shown, e))?
            .get(0);
        let existing: i64 = tx
            .query_one("SELECT COUNT(*) FROM clasp_shards", &[])
            .map_err(|e| pg_err(&shown, e))?
            .get(0);
        if models > 0 || existing > 0 {
            return Err(Error::Report(format!(
                "{shown}: only a new store can be sharded (this one has {models} models and \
                 {existing} shards); shard a new store, then `clasp store copy` into it"
            )));
        }
        tx.batch_execute(
            "CREATE EXTENSION IF NOT EXISTS postgres_fdw; CREATE EXTENSION IF NOT EXISTS dblink;",
        )
        .map_err(|e| pg_err(&shown, e))?;
        for (i, url) in shards.iter().enumerate() {
            let target = config(url, self.opts.timeout)?;
            let cfg = &target.cfg;
            let host = match cfg.get_hosts().first() {
                Some(postgres::config::Host::Tcp(h)) => h.clone(),
                _ => {
                    return Err(Error::Report(format!(
                        "{}: a shard needs a TCP host",
                        redact(url)
                    )))
                }
            };
            let port = cfg.get_ports().first().copied().unwrap_or(5432).to_string();
            let db = cfg.get_dbname().unwrap_or("postgres").to_string();
            let user = cfg.get_user().unwrap_or("postgres").to_string();
            let password = cfg
                .get_password()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .unwrap_or_default();
            // Reach the shard first, so a bad URL is named now.
            drop(connect_config(&target, &redact(url))?);
            let server = format!("clasp_shard_{i}");
            // DDL takes no parameters: PostgreSQL's own format() quotes the
            // values (%I identifiers, %L literals). postgres_fdw pushes a
            // k-NN query's ORDER BY down to each shard but not its LIMIT;
            // the coordinator merges the shards' ordered scans, so a small
            // fetch_size keeps each shard from sending its whole table
            // (measured: 700 ms -> see bench/RESULTS.md at 10k vectors).
            let statements: [(&str, Vec<&(dyn postgres::types::ToSql + Sync)>); 2] = [
                (
                    "SELECT format('CREATE SERVER %I FOREIGN DATA WRAPPER postgres_fdw OPTIONS
                       (host %L, port %L, dbname %L, extensions ''vector'',
                        async_capable ''true'', fetch_size ''100'', batch_size ''1000'')',
                       $1::text, $2::text, $3::text, $4::text)",
                    vec![&server, &host, &port, &db],
                ),
                (
                    "SELECT format('CREATE USER MAPPING FOR CURRENT_USER SERVER %I OPTIONS
                       (user %L, password %L)', $1::text, $2::text, $3::text)",
                    vec![&server, &user, &password],
                ),
            ];
            for (sql, params) in statements {
                let ddl: String = tx
                    .query_one(sql, &params)
                    .map_err(|e| pg_err(&shown, e))?
                    .get(0);
                tx.batch_execute(&ddl).map_err(|e| pg_err(&shown, e))?;
            }
            tx.execute(
                "INSERT INTO clasp_shards (idx, server, shown) VALUES ($1, $2, $3)",
                &[&(i as i32), &server, &redact(url)],
            )
            .map_err(|e| pg_err(&shown, e))?;
        }
        tx.commit().map_err(|e| pg_err(&shown, e))
    }
}

/// Writes inside one transaction. File rows and vectors are buffered and
/// sent as one multi-row statement each (`unnest` of array parameters), so
/// a batch costs a few round trips, not one per row; a removal, a move or
/// the end of the transaction sends what is buffered first, keeping the
/// order of the calls.
struct PgWriter<'a, 'b> {
    tx: &'a mut Transaction<'b>,
    shown: &'a str,
    files: Vec<FileRow>,
    vectors: Vec<(i64, Hash, Vec<f32>)>,
}

impl PgWriter<'_, '_> {
    fn err(&self, e: postgres::Error) -> Error {
        pg_err(self.shown, e)
    }

    fn flush(&mut self) -> Result<()> {
        if !self.files.is_empty() {
            // One statement may not update a row twice: the last write of a
            // path wins, as it would row by row.
            let mut last: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
            for (i, f) in self.files.iter().enumerate() {
                last.insert(&f.path, i);
            }
            let rows: Vec<&FileRow> = self
                .files
                .iter()
                .enumerate()
                .filter(|(i, f)| last[f.path.as_str()] == *i)
                .map(|x| x.1)
                .collect();
            let paths: Vec<&str> = rows.iter().map(|f| f.path.as_str()).collect();
            let sizes: Vec<i64> = rows.iter().map(|f| f.size as i64).collect();
            let mtimes: Vec<i64> = rows.iter().map(|f| f.mtime_ns).collect();
            let hashes: Vec<Option<&[u8]>> = rows
                .iter()
                .map(|f| f.hash.as_ref().map(|h| &h[..]))
                .collect();
            let errors: Vec<Option<&str>> = rows.iter().map(|f| f.error.as_deref()).collect();
            let captions: Vec<&str> = rows.iter().map(|f| f.caption.as_str()).collect();
            self.tx
                .execute(
                    "INSERT INTO clasp_files (path, size, mtime_ns, hash, error, caption)
                     SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[], $4::bytea[],
                                          $5::text[], $6::text[])
                     ON CONFLICT (path) DO UPDATE SET size = excluded.size,
                       mtime_ns = excluded.mtime_ns, hash = excluded.hash,
                       error = excluded.error, caption = excluded.caption",
                    &[&paths, &sizes, &mtimes, &hashes, &errors, &captions],
                )
                .map_err(|e| pg_err(self.shown, e))?;
            self.files.clear();
        }
        if !self.vectors.is_empty() {
            let mut by_model: std::collections::BTreeMap<i64, (Vec<Hash>, Vec<Vector>)> =
                Default::default();
            for (m, h, v) in std::mem::take(&mut self.vectors) {
                let e = by_model.entry(m).or_default();
                e.0.push(h);
                e.1.push(Vector::from(v));
            }
            for (m, (hashes, vecs)) in by_model {
                let hashes: Vec<&[u8]> = hashes.iter().map(|h| &h[..]).collect();
                let sql = format!(
                    "INSERT INTO {} (hash, embedding) SELECT * FROM unnest($1::bytea[], $2::vector[])
                     ON CONFLICT DO NOTHING", // vector -> halfvec by assignment cast
                    vectors_table(m)
                );
                self.tx
                    .execute(&sql, &[&hashes, &vecs])
                    .map_err(|e| pg_err(self.shown, e))?;
            }
        }
        Ok(())
    }
}

impl StoreWriter for PgWriter<'_, '_> {
    fn upsert_file(&mut self, f: &FileRow) -> Result<()> {
        self.files.push(f.clone());
        Ok(())
    }

    fn move_file(&mut self, from: &str, to: &FileRow) -> Result<()> {
        self.remove_file(from)?;
        self.upsert_file(to)
    }

    fn remove_file(&mut self, path: &str) -> Result<()> {
        self.flush()?;
        self.tx
            .execute("DELETE FROM clasp_files WHERE path = $1", &[&path])
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    fn put_vector(&mut self, model: i64, hash: &Hash, v: &[f32]) -> Result<()> {
        self.vectors.push((model, *hash, v.to_vec()));
        Ok(())
    }

    fn drop_orphan_vectors(&mut self) -> Result<usize> {
        self.flush()?;
        let ids: Vec<i64> = self
            .tx
            .query("SELECT id FROM clasp_models ORDER BY id", &[])
            .map_err(|e| self.err(e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut n = 0;
        for id in ids {
            let sql = format!(
                "DELETE FROM {t} v WHERE NOT EXISTS (SELECT 1 FROM clasp_files f WHERE f.hash = v.hash)",
                t = vectors_table(id)
            );
            n += self.tx.execute(&sql, &[]).map_err(|e| self.err(e))? as usize;
        }
        Ok(n)
    }
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Store for PgStore {
    fn describe(&self) -> String {
        self.shown.clone()
    }

    fn generation(&mut self) -> Result<i64> {
        self.client
            .query_one("SELECT value FROM clasp_meta WHERE key = 'generation'", &[])
            .map(|r| r.get(0))
            .map_err(|e| pg_err(&self.shown, e))
    }

    fn model_id(&mut self, key: &Hash, spec: &str, dim: usize) -> Result<i64> {
        let shown = self.shown.clone();
        let mut tx = self.client.transaction().map_err(|e| pg_err(&shown, e))?;
        // Two writers registering one model must not race on its table.
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
            .map_err(|e| pg_err(&shown, e))?;
        let row = tx
            .query_one(
                "INSERT INTO clasp_models (key, spec, dim, last_used, vtype) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (key) DO UPDATE SET spec = excluded.spec, last_used = excluded.last_used
                 RETURNING id, dim, vtype",
                &[&&key[..], &spec, &(dim as i32), &now_s(), &self.opts.vector_type.sql()],
            )
            .map_err(|e| pg_err(&shown, e))?;
        let (id, stored): (i64, i32) = (row.get(0), row.get(1));
        let vtype = VectorType::parse(row.get(2)).unwrap_or_default().sql();
        if stored as usize != dim {
            return Err(Error::Report(format!(
                "{shown}: the store holds this model with {stored}-d vectors, but it embeds to {dim}"
            )));
        }
        let t = vectors_table(id);
        let exists: bool = tx
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&t])
            .map_err(|e| pg_err(&shown, e))?
            .get(0);
        if !exists {
            let shards: Vec<String> = tx
                .query("SELECT server FROM clasp_shards ORDER BY idx", &[])
                .map_err(|e| pg_err(&shown, e))?
                .iter()
                .map(|r| r.get(0))
                .collect();
            if shards.is_empty() {
                // The HNSW index comes with the first search that wants it
                // (`PgStore::ensure_hnsw`), as the embedded store's graph
                // does: below the threshold searches are exact and the index
                // would only cost each insert a graph update (measured: it
                // halved indexing speed with a fast model).
                let storage = storage(dim);
                tx.batch_execute(&format!(
                    "CREATE TABLE {t} (hash BYTEA PRIMARY KEY, embedding {vtype}({dim}) {storage} NOT NULL);"
                ))
                .map_err(|e| pg_err(&shown, e))?;
            } else {
                create_sharded(&mut tx, &t, vtype, dim, &shards).map_err(|e| pg_err(&shown, e))?;
            }
        }
        tx.commit().map_err(|e| pg_err(&shown, e))?;
        Ok(id)
    }

    fn models(&mut self) -> Result<Vec<ModelRow>> {
        let rows = self
            .client
            .query(
                "SELECT id, key, spec, dim FROM clasp_models ORDER BY id",
                &[],
            )
            .map_err(|e| pg_err(&self.shown, e))?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                Some(ModelRow {
                    id: r.get(0),
                    key: hash_of(r.get::<_, &[u8]>(1))?,
                    spec: r.get(2),
                    dim: r.get::<_, i32>(3) as usize,
                })
            })
            .collect())
    }

    fn remembered_model_key(
        &mut self,
        weights: &Path,
        size: u64,
        mtime_ns: i64,
    ) -> Result<Option<Hash>> {
        let row = self
            .client
            .query_opt(
                "SELECT key FROM clasp_models WHERE weights_path = $1 AND weights_size = $2
                 AND weights_mtime_ns = $3 LIMIT 1",
                &[
                    &weights.to_string_lossy().as_ref(),
                    &(size as i64),
                    &mtime_ns,
                ],
            )
            .map_err(|e| pg_err(&self.shown, e))?;
        Ok(row.and_then(|r| hash_of(r.get::<_, &[u8]>(0))))
    }

    fn remember_model_file(
        &mut self,
        id: i64,
        weights: &Path,
        size: u64,
        mtime_ns: i64,
    ) -> Result<()> {
        self.client
            .execute(
                "UPDATE clasp_models SET weights_path = $2, weights_size = $3,
                 weights_mtime_ns = $4 WHERE id = $1",
                &[
                    &id,
                    &weights.to_string_lossy().as_ref(),
                    &(size as i64),
                    &mtime_ns,
                ],
            )
            .map(|_| ())
            .map_err(|e| pg_err(&self.shown, e))
    }

    fn last_model_spec(&mut self) -> Result<Option<String>> {
        self.client
            .query_opt(
                "SELECT spec FROM clasp_models ORDER BY last_used DESC, id DESC LIMIT 1",
                &[],
            )
            .map(|r| r.map(|r| r.get(0)))
            .map_err(|e| pg_err(&self.shown, e))
    }

    fn files_under(&mut self, prefixes: &[String]) -> Result<Vec<FileRow>> {
        let rows = self
            .client
            .query(
                "SELECT path, size, mtime_ns, hash, error, caption FROM clasp_files ORDER BY path",
                &[],
            )
            .map_err(|e| pg_err(&self.shown, e))?;
        Ok(rows
            .iter()
            .map(file_row)
            .filter(|r| under_any(&r.path, prefixes))
            .collect())
    }

    fn files_with_hashes(&mut self, hashes: &[Hash]) -> Result<Vec<FileRow>> {
        let keys: Vec<&[u8]> = hashes.iter().map(|h| &h[..]).collect();
        let rows = self
            .client
            .query(
                "SELECT path, size, mtime_ns, hash, error, caption FROM clasp_files
                 WHERE hash = ANY($1) ORDER BY path",
                &[&keys],
            )
            .map_err(|e| pg_err(&self.shown, e))?;
        Ok(rows.iter().map(file_row).collect())
    }

    fn caption_of(&mut self, path: &str) -> Result<Option<String>> {
        self.client
            .query_opt("SELECT caption FROM clasp_files WHERE path = $1", &[&path])
            .map(|r| r.map(|r| r.get(0)))
            .map_err(|e| pg_err(&self.shown, e))
    }

    fn has_vectors(&mut self, model: i64, hashes: &[Hash]) -> Result<Vec<bool>> {
        if hashes.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<&[u8]> = hashes.iter().map(|h| &h[..]).collect();
        let sql = format!(
            "SELECT hash FROM {} WHERE hash = ANY($1)",
            vectors_table(model)
        );
        let have: HashSet<Vec<u8>> = self
            .client
            .query(&sql, &[&keys])
            .map_err(|e| pg_err(&self.shown, e))?
            .iter()
            .map(|r| r.get::<_, Vec<u8>>(0))
            .collect();
        Ok(hashes.iter().map(|h| have.contains(&h[..])).collect())
    }

    fn model_vectors(&mut self, model: i64) -> Result<Vec<(Hash, Vec<f32>)>> {
        let sql = format!(
            "SELECT v.hash, v.embedding::vector FROM {} v WHERE EXISTS
             (SELECT 1 FROM clasp_files f WHERE f.hash = v.hash AND f.error IS NULL)
             ORDER BY v.hash",
            vectors_table(model)
        );
        let rows = self
            .client
            .query(&sql, &[])
            .map_err(|e| pg_err(&self.shown, e))?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                Some((
                    hash_of(r.get::<_, &[u8]>(0))?,
                    r.get::<_, Vector>(1).to_vec(),
                ))
            })
            .collect())
    }

    fn write_dyn(&mut self, f: &mut dyn FnMut(&mut dyn StoreWriter) -> Result<()>) -> Result<()> {
        let shown = self.shown.clone();
        let mut tx = self.client.transaction().map_err(|e| pg_err(&shown, e))?;
        // The embedded store's durability (SQLite WAL, synchronous=NORMAL):
        // a commit survives the client being killed at once, and a server
        // crash may lose the last moments of commits but never consistency;
        // a re-run embeds what was lost. It spares a WAL flush per batch.
        tx.batch_execute("SET LOCAL synchronous_commit = off")
            .map_err(|e| pg_err(&shown, e))?;
        // First, so that write transactions queue on this row and each
        // sees the ones before it.
        tx.execute(
            "UPDATE clasp_meta SET value = value + 1 WHERE key = 'generation'",
            &[],
        )
        .map_err(|e| pg_err(&shown, e))?;
        let mut w = PgWriter {
            tx: &mut tx,
            shown: &shown,
            files: Vec::new(),
            vectors: Vec::new(),
        };
        f(&mut w)?;
        w.flush()?;
        tx.commit().map_err(|e| pg_err(&shown, e))
    }

    fn text_search(&mut self, query: &str, limit: usize) -> Result<Vec<(String, f64)>> {
        // OR-ed lower-case words: user text is never tsquery syntax.
        let terms: Vec<String> = query
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(|w| w.to_lowercase())
            .collect();
        if terms.is_empty() {
            return Ok(Vec::new());
        }
        let q = terms.join(" | ");
        let rows = self
            .client
            .query(
                "SELECT path, ts_rank(caption_tsv, q)::float8 FROM clasp_files,
                 to_tsquery('simple', $1) q WHERE caption_tsv @@ q
                 ORDER BY 2 DESC, path LIMIT $2",
                &[&q, &(limit as i64)],
            )
            .map_err(|e| pg_err(&self.shown, e))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    fn check(&mut self, model: Option<i64>) -> Result<Vec<String>> {
        let mut problems = Vec::new();
        let models = self.models()?;
        for m in &models {
            let sql = format!(
                "SELECT COUNT(*) FROM {} v WHERE NOT EXISTS
                 (SELECT 1 FROM clasp_files f WHERE f.hash = v.hash)",
                vectors_table(m.id)
            );
            let orphans: i64 = self
                .client
                .query_one(&sql, &[])
                .map_err(|e| pg_err(&self.shown, e))?
                .get(0);
            if orphans > 0 {
                problems.push(format!(
                    "{orphans} vectors of model {} belong to no file",
                    m.id
                ));
            }
        }
        if let Some(id) = model {
            let sql = format!(
                "SELECT COUNT(*) FROM clasp_files f WHERE f.error IS NULL AND NOT EXISTS
                 (SELECT 1 FROM {} v WHERE v.hash = f.hash)",
                vectors_table(id)
            );
            let missing: i64 = self
                .client
                .query_one(&sql, &[])
                .map_err(|e| pg_err(&self.shown, e))?
                .get(0);
            if missing > 0 {
                problems.push(format!("{missing} files have no vector for this model"));
            }
        }
        let bad: i64 = self
            .client
            .query_one(
                "SELECT COUNT(*) FROM clasp_files WHERE error IS NULL AND hash IS NULL",
                &[],
            )
            .map_err(|e| pg_err(&self.shown, e))?
            .get(0);
        if bad > 0 {
            problems.push(format!("{bad} embeddable files have no content hash"));
        }
        Ok(problems)
    }

    fn engine(&mut self, model: i64, ann_threshold: usize) -> Result<Box<dyn VectorSearch>> {
        let (dim, vtype) = self.column(model)?;
        let shards: Vec<(String, String)> = self
            .client
            .query("SELECT server, shown FROM clasp_shards ORDER BY idx", &[])
            .map_err(|e| pg_err(&self.shown, e))?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let table = vectors_table(model);
        let n: i64 = if shards.is_empty() {
            self.client
                .query_one(&format!("SELECT COUNT(*) FROM {table}"), &[])
                .map_err(|e| pg_err(&self.shown, e))?
                .get(0)
        } else {
            // Shard by shard, so one that is down is named (or, with
            // allow_partial, left out of the count).
            let mut n = 0;
            for (i, (server, shown)) in shards.iter().enumerate() {
                match self
                    .client
                    .query_one(&format!("SELECT COUNT(*) FROM {table}_p{i}"), &[])
                {
                    Ok(r) => n += r.get::<_, i64>(0),
                    Err(e) => {
                        let e = shard_err(server, shown, e);
                        if !self.opts.allow_partial {
                            return Err(e);
                        }
                        tracing::warn!("{e}; answering without it (--allow-partial)");
                    }
                }
            }
            n
        };
        let ann = n as usize >= ann_threshold && n > 0;
        if ann {
            self.ensure_hnsw(model, dim, vtype)?;
        }
        let mut search = PgSearch {
            conns: Vec::new(),
            connected: Mutex::new(vec![false; shards.len()]),
            shards,
            allow_partial: self.opts.allow_partial,
            missing: Mutex::new(Vec::new()),
            table,
            vtype: vtype.sql(),
            n: n as usize,
            dim,
            ann,
            ef_search: Mutex::new(None),
        };
        for url in &self.opts.replicas {
            let shown = redact(url);
            match config(url, self.opts.timeout).and_then(|c| connect_config(&c, &shown)) {
                Ok(c) => search.conns.push((shown, Mutex::new(c))),
                Err(e) => tracing::warn!("skipping replica: {e}"),
            }
        }
        if search.conns.is_empty() {
            let c = connect_config(&self.config, &self.shown)?;
            search.conns.push((self.shown.clone(), Mutex::new(c)));
        }
        Ok(Box::new(search))
    }

    fn claim(&mut self, hashes: &[Hash]) -> Result<Vec<bool>> {
        if hashes.is_empty() {
            return Ok(Vec::new());
        }
        // One round trip: the locks are taken in the array's order.
        let keys: Vec<i64> = hashes.iter().map(lock_key).collect();
        let rows = self
            .client
            .query(
                "SELECT pg_try_advisory_lock(k) FROM unnest($1::int8[]) WITH ORDINALITY AS t(k, i)
                 ORDER BY i",
                &[&keys],
            )
            .map_err(|e| pg_err(&self.shown, e))?;
        Ok(rows.iter().map(|r| r.get::<_, bool>(0)).collect())
    }

    fn claim_wait(&mut self, hash: &Hash) -> Result<()> {
        self.client
            .execute("SELECT pg_advisory_lock($1)", &[&lock_key(hash)])
            .map(|_| ())
            .map_err(|e| pg_err(&self.shown, e))
    }

    fn release_claims(&mut self) -> Result<()> {
        self.client
            .execute("SELECT pg_advisory_unlock_all()", &[])
            .map(|_| ())
            .map_err(|e| pg_err(&self.shown, e))
    }
}

/// k-NN on the server. Below the HNSW threshold (or with `exact`), the
/// query orders by negative inner product, which no index serves, so the
/// scan is exact; above, by cosine distance through the HNSW index.
/// Vectors are unit length, so both scores equal the inner product.
pub struct PgSearch {
    /// (name, connection): the replicas when given, else the primary. The
    /// first that answers serves each query.
    conns: Vec<(String, Mutex<Client>)>,
    /// The shards' foreign servers with their redacted URLs, when the
    /// store is sharded: a query then fans out to them (see
    /// [`PgSearch::fan_out`]).
    shards: Vec<(String, String)>,
    /// Which shards' dblink connections are open.
    connected: Mutex<Vec<bool>>,
    /// Answer from the shards that answer (`--allow-partial`) instead of
    /// failing when one does not.
    allow_partial: bool,
    /// The shards that did not answer the latest search.
    missing: Mutex<Vec<String>>,
    table: String,
    /// The column's type: `vector` or `halfvec`.
    vtype: &'static str,
    n: usize,
    dim: usize,
    ann: bool,
    ef_search: Mutex<Option<usize>>,
}

/// A vector as a pgvector literal: Rust's shortest round-trip decimal of
/// each f32, so the server parses back the same floats.
fn vector_literal(v: &[f32]) -> String {
    let mut s = String::with_capacity(v.len() * 12);
    s.push('[');
    for (i, x) in v.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&format!("{x:?}"));
    }
    s.push(']');
    s
}

impl PgSearch {
    /// k-NN over a sharded store: the same query, with its LIMIT, sent to
    /// every shard at once through dblink (`dblink_send_query` returns at
    /// once; the shards work in parallel), each answered by the shard's own
    /// table and HNSW index; the coordinator session collects the shards'
    /// top k and they are merged here. postgres_fdw's merge of ordered
    /// scans, the plain path, cannot push the LIMIT (nor `hnsw.ef_search`)
    /// down; bench/RESULTS.md has both measured. The query text carries
    /// only numbers and hex formatted here, never user text.
    fn fan_out(
        &self,
        c: &mut Client,
        query: &[f32],
        k: usize,
        allow: Option<&HashSet<Hash>>,
        ef: Option<usize>,
    ) -> Result<Vec<(Hash, f32)>> {
        let mut connected = self.connected.lock().expect("shard connections lock");
        let v = vector_literal(query);
        let filter = allow.map(|a| {
            let list: Vec<String> = a
                .iter()
                .map(|h| {
                    let hex: String = h.iter().map(|b| format!("{b:02x}")).collect();
                    format!("'\\x{hex}'::bytea")
                })
                .collect();
            format!("WHERE hash IN ({})", list.join(","))
        });
        let filter = filter.as_deref().unwrap_or("");
        let mut missing = Vec::new();
        // A shard that fails: its connection is dropped (the next search
        // reconnects), and it is either skipped (`--allow-partial`) or the
        // search fails naming it.
        let mut failed =
            |c: &mut Client, connected: &mut [bool], i: usize, e: postgres::Error| -> Result<()> {
                let (server, shown) = &self.shards[i];
                if connected[i] {
                    let _ = c.execute("SELECT dblink_disconnect($1)", &[&format!("clasp_q{i}")]);
                    connected[i] = false;
                }
                let e = shard_err(server, shown, e);
                if self.allow_partial {
                    tracing::warn!("{e}; answering without it (--allow-partial)");
                    missing.push(format!("{server} ({shown})"));
                    Ok(())
                } else {
                    Err(e)
                }
            };
        let mut sent = vec![false; self.shards.len()];
        for (i, (server, _)) in self.shards.iter().enumerate() {
            let name = format!("clasp_q{i}");
            let part = format!("{}_p{i}", self.table);
            let r = (|| {
                if !connected[i] {
                    c.execute("SELECT dblink_connect($1, $2)", &[&name, server])?;
                    connected[i] = true;
                }
                if self.ann {
                    let ef = ef.unwrap_or(40).max(1);
                    c.execute(
                        "SELECT dblink_exec($1, $2)",
                        &[&name, &format!("SET hnsw.ef_search = {ef}")],
                    )?;
                    if allow.is_some() {
                        c.execute(
                            "SELECT dblink_exec($1, $2)",
                            &[&name, &"SET hnsw.iterative_scan = strict_order"],
                        )?;
                    }
                }
                let sql = if self.ann {
                    format!(
                        "SELECT hash, (1 - (embedding <=> '{v}'))::float4 FROM {part} {filter}
                         ORDER BY embedding <=> '{v}' LIMIT {k}"
                    )
                } else {
                    format!(
                        "SELECT hash, (-(embedding <#> '{v}'))::float4 FROM {part} {filter}
                         ORDER BY embedding <#> '{v}', hash LIMIT {k}"
                    )
                };
                c.execute("SELECT dblink_send_query($1, $2)", &[&name, &sql])?;
                Ok::<_, postgres::Error>(())
            })();
            match r {
                Ok(()) => sent[i] = true,
                Err(e) => failed(c, &mut connected, i, e)?,
            }
        }
        let mut hits: Vec<(Hash, f32)> = Vec::new();
        for i in (0..self.shards.len()).filter(|&i| sent[i]) {
            let name = format!("clasp_q{i}");
            let r = (|| {
                let rows = c.query(
                    "SELECT hash, score FROM dblink_get_result($1) AS t(hash bytea, score float4)",
                    &[&name],
                )?;
                // The end-of-results marker that dblink_get_result leaves.
                c.query(
                    "SELECT * FROM dblink_get_result($1) AS t(hash bytea, score float4)",
                    &[&name],
                )?;
                Ok::<_, postgres::Error>(rows)
            })();
            match r {
                Ok(rows) => hits
                    .extend(rows.iter().filter_map(|r| {
                        Some((hash_of(r.get::<_, &[u8]>(0))?, r.get::<_, f32>(1)))
                    })),
                Err(e) => failed(c, &mut connected, i, e)?,
            }
        }
        if missing.len() == self.shards.len() {
            return Err(Error::Report(format!(
                "no shard answered: {}",
                missing.join(", ")
            )));
        }
        *self.missing.lock().expect("missing shards lock") = missing;
        hits.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        hits.truncate(k);
        Ok(hits)
    }
}

impl VectorSearch for PgSearch {
    fn search(
        &self,
        query: &[f32],
        k: usize,
        allow: Option<&HashSet<Hash>>,
    ) -> Result<Vec<(Hash, f32)>> {
        if query.len() != self.dim {
            return Err(Error::Report(format!(
                "the query has {} dimensions, the store's vectors {}",
                query.len(),
                self.dim
            )));
        }
        let q = Vector::from(query.to_vec());
        let allow_set = allow;
        let allow: Option<Vec<&[u8]>> = allow.map(|s| s.iter().map(|h| &h[..]).collect());
        let filter = if allow.is_some() {
            "WHERE hash = ANY($2)"
        } else {
            ""
        };
        let sql = if self.ann {
            format!(
                "SELECT hash, (1 - (embedding <=> $1::vector::{v}))::float4 FROM {t} {filter}
                 ORDER BY embedding <=> $1::vector::{v} LIMIT {k}",
                v = self.vtype,
                t = self.table
            )
        } else {
            format!(
                "SELECT hash, (-(embedding <#> $1::vector::{v}))::float4 FROM {t} {filter}
                 ORDER BY embedding <#> $1::vector::{v}, hash LIMIT {k}",
                v = self.vtype,
                t = self.table
            )
        };
        let ef = *self.ef_search.lock().expect("ef_search lock");
        let mut last = None;
        for (name, conn) in &self.conns {
            let mut c = conn.lock().expect("connection lock");
            if !self.shards.is_empty() {
                match self.fan_out(&mut c, query, k, allow_set, ef) {
                    Ok(hits) => return Ok(hits),
                    Err(e) => {
                        last = Some(Error::Report(format!("{name}: {e}")));
                        continue;
                    }
                }
            }
            let r = (|| {
                let mut tx = c.transaction()?;
                if self.ann {
                    if let Some(ef) = ef {
                        tx.batch_execute(&format!("SET LOCAL hnsw.ef_search = {}", ef.max(1)))?;
                    }
                    if allow.is_some() {
                        tx.batch_execute("SET LOCAL hnsw.iterative_scan = strict_order")?;
                    }
                }
                let rows = match &allow {
                    Some(a) => tx.query(&sql, &[&q, a])?,
                    None => tx.query(&sql, &[&q])?,
                };
                tx.commit()?;
                Ok::<_, postgres::Error>(rows)
            })();
            match r {
                Ok(rows) => {
                    return Ok(rows
                        .iter()
                        .filter_map(|r| Some((hash_of(r.get::<_, &[u8]>(0))?, r.get(1))))
                        .collect())
                }
                Err(e) => {
                    let e = pg_err(name, e);
                    if self.conns.len() > 1 {
                        tracing::warn!("{e}; trying the next server");
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.expect("at least one connection"))
    }

    fn len(&self) -> usize {
        self.n
    }

    fn unanswered(&self) -> Vec<String> {
        self.missing.lock().expect("missing shards lock").clone()
    }

    /// pgvector's `hnsw.ef_search`.
    fn set_ef_search(&self, ef: usize) {
        *self.ef_search.lock().expect("ef_search lock") = Some(ef);
    }

    fn name(&self) -> &'static str {
        if self.ann {
            "pgvector-hnsw"
        } else {
            "pgvector-exact"
        }
    }
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
