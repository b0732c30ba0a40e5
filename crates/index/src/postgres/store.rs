//! `Store` for PostgreSQL: the catalog's reads and writes, claims, and checks.

use super::*;

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
