//! k-NN on the server (pgvector), across replicas and shards.

use super::*;

/// k-NN on the server. Below the HNSW threshold (or with `exact`), the
/// query orders by negative inner product, which no index serves, so the
/// scan is exact; above, by cosine distance through the HNSW index.
/// Vectors are unit length, so both scores equal the inner product.
pub struct PgSearch {
    /// (name, connection): the replicas when given, else the primary. The
    /// first that answers serves each query.
    pub(super) conns: Vec<(String, Mutex<Client>)>,
    /// The shards' foreign servers with their redacted URLs, when the
    /// store is sharded: a query then fans out to them (see
    /// [`PgSearch::fan_out`]).
    pub(super) shards: Vec<(String, String)>,
    /// Which shards' dblink connections are open.
    pub(super) connected: Mutex<Vec<bool>>,
    /// Answer from the shards that answer (`--allow-partial`) instead of
    /// failing when one does not.
    pub(super) allow_partial: bool,
    /// The shards that did not answer the latest search.
    pub(super) missing: Mutex<Vec<String>>,
    pub(super) table: String,
    /// The column's type: `vector` or `halfvec`.
    pub(super) vtype: &'static str,
    pub(super) n: usize,
    pub(super) dim: usize,
    pub(super) ann: bool,
    pub(super) ef_search: Mutex<Option<usize>>,
}

/// A vector as a pgvector literal: Rust's shortest round-trip decimal of
/// each f32, so the server parses back the same floats.
pub(super) fn vector_literal(v: &[f32]) -> String {
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
    /// The SELECT of the best `k` rows for a query of width `qdim` given as
    /// `p` (a parameter or a literal) from `table` with `filter`: through
    /// HNSW by cosine distance, exactly by inner product, or, for rows of
    /// several vectors (BLIP-2's queries), exactly by the best of their
    /// inner products (pgvector's `subvector`), which no index serves.
    fn knn_sql(&self, qdim: usize, p: &str, table: &str, filter: &str, k: usize) -> String {
        if qdim != self.dim {
            let best: Vec<String> = (0..self.dim / qdim)
                .map(|i| format!("-(subvector(embedding, {}, {qdim}) <#> {p})", i * qdim + 1))
                .collect();
            format!(
                "SELECT hash, GREATEST({})::float4 AS score FROM {table} {filter}
                 ORDER BY score DESC, hash LIMIT {k}",
                best.join(", ")
            )
        } else if self.ann {
            format!(
                "SELECT hash, (1 - (embedding <=> {p}))::float4 FROM {table} {filter}
                 ORDER BY embedding <=> {p} LIMIT {k}"
            )
        } else {
            format!(
                "SELECT hash, (-(embedding <#> {p}))::float4 FROM {table} {filter}
                 ORDER BY embedding <#> {p}, hash LIMIT {k}"
            )
        }
    }

    /// k-NN over a sharded store: the same query, with its LIMIT, sent to
    /// every shard at once through dblink (`dblink_send_query` returns at
    /// once; the shards work in parallel), each answered by the shard's own
    /// table and HNSW index; the coordinator session collects the shards'
    /// top k and they are merged here. postgres_fdw's merge of ordered
    /// scans, the plain path, cannot push the LIMIT (nor `hnsw.ef_search`)
    /// down; bench/RESULTS.md has both measured. The query text carries
    /// only numbers and hex formatted here, never user text.
    pub(super) fn fan_out(
        &self,
        c: &mut Client,
        query: &[f32],
        k: usize,
        allow: Option<&HashSet<Hash>>,
        ef: Option<usize>,
    ) -> Result<Vec<(Hash, f32)>> {
        let mut connected = self.connected.lock().expect("shard connections lock");
        let v = vector_literal(query);
        let ann = self.ann && query.len() == self.dim;
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
                if ann {
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
                let sql = self.knn_sql(query.len(), &format!("'{v}'"), &part, filter, k);
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
        if query.is_empty() || !self.dim.is_multiple_of(query.len()) {
            return Err(Error::Report(format!(
                "the query has {} dimensions, the store's vectors {}",
                query.len(),
                self.dim
            )));
        }
        let ann = self.ann && query.len() == self.dim;
        let q = Vector::from(query.to_vec());
        let allow_set = allow;
        let allow: Option<Vec<&[u8]>> = allow.map(|s| s.iter().map(|h| &h[..]).collect());
        let filter = if allow.is_some() {
            "WHERE hash = ANY($2)"
        } else {
            ""
        };
        let p = format!("$1::vector::{}", self.vtype);
        let sql = self.knn_sql(query.len(), &p, &self.table, filter, k);
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
                if ann {
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
