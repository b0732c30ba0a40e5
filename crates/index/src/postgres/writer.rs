//! The store's writer: one write transaction, files and vectors sent in buffered batches.

use super::*;

/// Writes inside one transaction. File rows and vectors are buffered and
/// sent as one multi-row statement each (`unnest` of array parameters), so
/// a batch costs a few round trips, not one per row; a removal, a move or
/// the end of the transaction sends what is buffered first, keeping the
/// order of the calls.
pub(super) struct PgWriter<'a, 'b> {
    pub(super) tx: &'a mut Transaction<'b>,
    pub(super) shown: &'a str,
    pub(super) files: Vec<FileRow>,
    pub(super) vectors: Vec<(i64, Hash, Vec<f32>)>,
}

impl PgWriter<'_, '_> {
    pub(super) fn err(&self, e: postgres::Error) -> Error {
        pg_err(self.shown, e)
    }

    pub(super) fn flush(&mut self) -> Result<()> {
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

pub(super) fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
