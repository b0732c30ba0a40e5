//! The schema: tables, per-model vector tables and their HNSW indexes, and sharding over postgres_fdw.

use super::*;

impl PgStore {
    /// Builds model `model`'s HNSW index (`vector_cosine_ops`) if it has
    /// none: on the table itself, or, for a sharded model, on every shard
    /// at once (each shard builds its own partition's index, in parallel,
    /// through dblink). Loading is faster without an index to maintain, so
    /// it is made at the first search that wants it; once built,
    /// PostgreSQL keeps it up to date on every insert.
    pub(super) fn ensure_hnsw(&mut self, model: i64, dim: usize, vtype: VectorType) -> Result<()> {
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
    pub(super) fn column(&mut self, model: i64) -> Result<(usize, VectorType)> {
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
pub(super) fn create_sharded(
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
