//! Incremental indexing of image folders into a [`Catalog`].
//!
//! 1. Walk the roots. A file whose size and mtime match its catalog row is
//!    unchanged; the others are hashed (in parallel).
//! 2. A new path whose hash belongs to a vanished path is a move; vanished
//!    paths left over are removals. Moves, removals and metadata-only
//!    changes are committed in one transaction.
//! 3. Files whose content has no vector for the model are decoded on worker
//!    threads while the encoder embeds the previous batch; each batch's rows
//!    and vectors are committed together, so a killed run loses at most the
//!    batch in flight and the next run carries on.
//!
//! Videos (with [`IndexOptions::video`]) are hashed as they are read, and
//! embedded whole and in segments ([`super::video_segments`]); a video's
//! segment rows follow it when it moves, and go when it goes or changes.

use crate::preprocess::pipeline;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::catalog::{FileRow, Hash};
use super::store::Store;
use super::video_segments::{self as vs, is_video, VideoOptions};
use super::walk::{self, Found, Skipped};
use crate::preprocess::image::decode_image;
use crate::progress::Progress;
use crate::{Embedder, Error, Result};

#[derive(Clone, Debug, Default)]
pub struct IndexOptions {
    pub batch_size: usize,
    /// Glob patterns of paths to leave out.
    pub excludes: Vec<String>,
    /// Index videos too, cut so; `None` leaves them out.
    pub video: Option<VideoOptions>,
}

/// What an indexing run did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Summary {
    pub added: usize,
    pub updated: usize,
    pub moved: usize,
    pub removed: usize,
    /// Unchanged files (and copies of content already embedded).
    pub unchanged: usize,
    /// Vectors computed by the encoder in this run (a video counts once).
    pub embedded: usize,
    /// Video segments embedded in this run.
    pub segments: usize,
    /// Files that could not be embedded: (path, reason).
    pub failed: Vec<(String, String)>,
    /// Entries the walk could not index: (path, reason).
    pub skipped: Vec<(String, String)>,
}

/// A file that needs a fresh catalog row.
struct Pending {
    found: Found,
    hash: Option<Hash>,
    error: Option<String>,
    caption: String,
    /// Its row existed before (an update rather than an addition).
    existed: bool,
}

fn row_of(p: &Pending) -> FileRow {
    FileRow {
        path: p.found.path.to_string_lossy().into_owned(),
        size: p.found.size,
        mtime_ns: p.found.mtime_ns,
        hash: p.hash,
        error: p.error.clone(),
        caption: p.caption.clone(),
    }
}

/// Indexes `roots` for the model `model_id` (see [`super::model_id`]).
pub fn index(
    catalog: &mut dyn Store,
    encoder: &dyn Embedder,
    model_id: i64,
    roots: &[PathBuf],
    opts: &IndexOptions,
    progress: &dyn Progress,
) -> Result<Summary> {
    let excludes = walk::globset(&opts.excludes)?;
    if let Some(v) = &opts.video {
        v.check()?;
    }
    let roots: Vec<PathBuf> = roots
        .iter()
        .map(|r| walk::canonical_root(r))
        .collect::<Result<_>>()?;
    let prefixes: Vec<String> = roots
        .iter()
        .map(|r| r.to_string_lossy().into_owned())
        .collect();
    let mut summary = Summary::default();

    // 1. Walk.
    let mut found: Vec<Found> = Vec::new();
    for r in &roots {
        let (f, s) = walk::scan(r, &excludes, opts.video.is_some());
        found.extend(f);
        summary.skipped.extend(
            s.into_iter()
                .map(|Skipped { path, reason }| (path.display().to_string(), reason)),
        );
    }
    found.sort_by(|a, b| a.path.cmp(&b.path));
    found.dedup_by(|a, b| a.path == b.path);
    let mut existing: HashMap<String, FileRow> = catalog
        .files_under(&prefixes)?
        .into_iter()
        .map(|r| (r.path.clone(), r))
        .collect();
    // A video's segments are rows of their own, kept apart: they follow
    // their video.
    let mut segments_of: HashMap<String, Vec<FileRow>> = HashMap::new();
    existing.retain(|path, row| match vs::parse_segment(path) {
        Some((video, _, _)) => {
            segments_of
                .entry(video.to_string())
                .or_default()
                .push(row.clone());
            false
        }
        None => true,
    });

    let mut unchanged_ok: Vec<FileRow> = Vec::new();
    let mut to_hash: Vec<(Found, bool)> = Vec::new();
    for f in found.iter() {
        let key = f.path.to_string_lossy();
        match existing.get(key.as_ref()) {
            Some(row) if row.size == f.size && row.mtime_ns == f.mtime_ns && row.hash.is_some() => {
                match &row.error {
                    None => unchanged_ok.push(row.clone()),
                    Some(e) => summary
                        .failed
                        .push((row.path.clone(), format!("{e} (unchanged since last run)"))),
                }
            }
            Some(_) => to_hash.push((f.clone(), true)),
            None => to_hash.push((f.clone(), false)),
        }
    }

    // Hash (and read captions of) new and changed files, in parallel.
    progress.start("hashing", to_hash.len() as u64);
    let hashed: Vec<Pending> = to_hash
        .into_par_iter()
        .map(|(found, existed)| {
            let r = if is_video(&found.path) {
                // A video is hashed as it is read, never held whole.
                let mut h = blake3::Hasher::new();
                std::fs::File::open(&found.path)
                    .and_then(|mut f| std::io::copy(&mut f, &mut h))
                    .map(|_| {
                        (
                            *h.finalize().as_bytes(),
                            walk::caption_for(&found.path, &[]),
                        )
                    })
            } else {
                std::fs::read(&found.path).map(|bytes| {
                    let caption = walk::caption_for(&found.path, &bytes);
                    (*blake3::hash(&bytes).as_bytes(), caption)
                })
            };
            progress.inc(1);
            match r {
                Ok((hash, caption)) => Pending {
                    hash: Some(hash),
                    caption,
                    error: None,
                    found,
                    existed,
                },
                Err(e) => Pending {
                    hash: None,
                    caption: String::new(),
                    error: Some(e.to_string()),
                    found,
                    existed,
                },
            }
        })
        .collect();
    progress.finish();

    // 2. Moves, removals, copies and metadata-only changes.
    let found_paths: HashSet<String> = found
        .iter()
        .map(|f| f.path.to_string_lossy().into_owned())
        .collect();
    let mut vanished_by_hash: HashMap<Hash, Vec<String>> = HashMap::new();
    for (path, row) in &existing {
        if !found_paths.contains(path) {
            if let Some(h) = row.hash {
                vanished_by_hash.entry(h).or_default().push(path.clone());
            }
        }
    }
    for v in vanished_by_hash.values_mut() {
        v.sort();
    }
    let mut moves: Vec<(String, Pending)> = Vec::new();
    let mut same_content: Vec<Pending> = Vec::new();
    let mut needs_vector: Vec<Pending> = Vec::new();
    let mut unreadable: Vec<Pending> = Vec::new();
    for p in hashed {
        let Some(h) = p.hash else {
            unreadable.push(p);
            continue;
        };
        let path = p.found.path.to_string_lossy().into_owned();
        let old = existing.get(&path);
        if old.is_some_and(|o| o.hash == Some(h)) {
            same_content.push(p); // touched, not changed
            continue;
        }
        if !p.existed {
            if let Some(from) = vanished_by_hash.get_mut(&h).and_then(|v| v.pop()) {
                moves.push((from, p));
                continue;
            }
        }
        needs_vector.push(p);
    }
    let moved_from: HashSet<&String> = moves.iter().map(|(f, _)| f).collect();
    let removed: Vec<String> = existing
        .keys()
        .filter(|p| !found_paths.contains(*p) && !moved_from.contains(p))
        .cloned()
        .collect();
    // Content that already has a vector (copies, content seen before) needs no encoder.
    let have = reusable(catalog, model_id, &needs_vector)?;
    let (known, mut fresh): (Vec<_>, Vec<_>) =
        needs_vector.into_iter().zip(have).partition(|(_, h)| *h);
    let known: Vec<Pending> = known.into_iter().map(|(p, _)| p).collect();
    // Unchanged files whose content lacks a vector for this model (a new
    // model, or a run interrupted before this file's batch committed).
    let unchanged_hashes: Vec<Hash> = unchanged_ok.iter().map(|r| r.hash.unwrap()).collect();
    let unchanged_have = catalog.has_vectors(model_id, &unchanged_hashes)?;
    let mut reembed_unchanged = Vec::new();
    for (row, have) in unchanged_ok.into_iter().zip(unchanged_have) {
        if have {
            summary.unchanged += 1;
        } else {
            reembed_unchanged.push(Pending {
                found: Found {
                    path: PathBuf::from(&row.path),
                    size: row.size,
                    mtime_ns: row.mtime_ns,
                },
                hash: row.hash,
                error: None,
                caption: row.caption.clone(),
                existed: true,
            });
        }
    }
    // Segments whose video is gone without a row of its own.
    let stray: Vec<&String> = segments_of
        .iter()
        .filter(|(v, _)| !existing.contains_key(*v) && !found_paths.contains(*v))
        .flat_map(|(_, rows)| rows.iter().map(|r| &r.path))
        .collect();
    catalog.write(|w| {
        for (from, p) in &moves {
            let to = row_of(p);
            w.move_file(from, &to)?;
            for s in segments_of.get(from).into_iter().flatten() {
                if let Some((_, a, b)) = vs::parse_segment(&s.path) {
                    let moved = FileRow {
                        path: vs::segment_path(&to.path, a, b),
                        size: to.size,
                        mtime_ns: to.mtime_ns,
                        ..s.clone()
                    };
                    w.move_file(&s.path, &moved)?;
                }
            }
        }
        for path in &removed {
            w.remove_file(path)?;
            for s in segments_of.get(path).into_iter().flatten() {
                w.remove_file(&s.path)?;
            }
        }
        for path in &stray {
            w.remove_file(path)?;
        }
        for p in same_content.iter().chain(&known).chain(&unreadable) {
            w.upsert_file(&row_of(p))?;
        }
        Ok(())
    })?;
    summary.moved = moves.len();
    summary.removed = removed.len();
    summary.unchanged += same_content.len();
    for p in &known {
        if p.existed {
            summary.updated += 1;
        } else {
            summary.added += 1;
        }
    }
    for p in &unreadable {
        summary.failed.push((
            p.found.path.display().to_string(),
            p.error.clone().unwrap_or_default(),
        ));
    }

    // 3. Embed what is new, deduplicated by content.
    fresh.sort_by(|a, b| a.0.found.path.cmp(&b.0.found.path));
    let mut todo: Vec<Pending> = fresh.into_iter().map(|(p, _)| p).collect();
    todo.extend(reembed_unchanged);
    let run = Run {
        encoder,
        model_id,
        batch_size: opts.batch_size.max(1),
        progress,
        video: opts.video,
        old_segments: segments_of
            .into_iter()
            .map(|(v, rows)| (v, rows.into_iter().map(|r| r.path).collect()))
            .collect(),
    };
    embed_claimed(catalog, &run, todo, &mut summary)?;
    catalog.write(|w| w.drop_orphan_vectors().map(|_| ()))?;
    Ok(summary)
}

/// Content claimed per round: few enough that a second writer waiting on
/// it waits little, enough to keep the encoder's batches full.
const CLAIM_CHUNK: usize = 256;

/// Which of `ps` need no embedding: their content has a vector for
/// `model` already. Never a video, whose segment rows only embedding
/// writes (a copy or a new path has none yet).
fn reusable(store: &mut dyn Store, model: i64, ps: &[Pending]) -> Result<Vec<bool>> {
    let hashes: Vec<Hash> = ps.iter().map(|p| p.hash.unwrap()).collect();
    let have = store.has_vectors(model, &hashes)?;
    Ok(ps
        .iter()
        .zip(have)
        .map(|(p, h)| h && !is_video(&p.found.path))
        .collect())
}

/// What embedding needs besides the store.
struct Run<'a> {
    encoder: &'a dyn Embedder,
    model_id: i64,
    batch_size: usize,
    progress: &'a dyn Progress,
    video: Option<VideoOptions>,
    /// The segment rows each video had before this run.
    old_segments: HashMap<String, Vec<String>>,
}

/// Embeds `todo` a chunk at a time, each chunk's content claimed first
/// ([`Store::claim`]): content another writer holds is left for the end,
/// then waited for, and embedded only if that writer did not.
fn embed_claimed(
    store: &mut dyn Store,
    run: &Run,
    todo: Vec<Pending>,
    summary: &mut Summary,
) -> Result<()> {
    let progress = run.progress;
    if todo.is_empty() {
        return Ok(());
    }
    progress.start("indexing", todo.len() as u64);
    let mut deferred: Vec<Pending> = Vec::new();
    let mut rest = todo.into_iter().peekable();
    while rest.peek().is_some() {
        let chunk: Vec<Pending> = rest.by_ref().take(CLAIM_CHUNK).collect();
        let hashes: Vec<Hash> = chunk.iter().map(|p| p.hash.unwrap()).collect();
        let claimed = store.claim(&hashes)?;
        let (mine, theirs): (Vec<_>, Vec<_>) = chunk.into_iter().zip(claimed).partition(|x| x.1);
        deferred.extend(theirs.into_iter().map(|x| x.0));
        let mine = mine.into_iter().map(|x| x.0).collect();
        let mine = record_done(store, run, mine, summary)?;
        embed_pending(store, run, mine, summary)?;
        store.release_claims()?;
    }
    let mut rest = deferred.into_iter().peekable();
    while rest.peek().is_some() {
        let chunk: Vec<Pending> = rest.by_ref().take(CLAIM_CHUNK).collect();
        for p in &chunk {
            store.claim_wait(p.hash.as_ref().unwrap())?;
        }
        let mine = record_done(store, run, chunk, summary)?;
        embed_pending(store, run, mine, summary)?;
        store.release_claims()?;
    }
    progress.finish();
    Ok(())
}

/// Records the files whose content has a vector by now (another writer
/// embedded it) and returns the others.
fn record_done(
    store: &mut dyn Store,
    run: &Run,
    chunk: Vec<Pending>,
    summary: &mut Summary,
) -> Result<Vec<Pending>> {
    let have = reusable(store, run.model_id, &chunk)?;
    let (done, todo): (Vec<_>, Vec<_>) = chunk.into_iter().zip(have).partition(|x| x.1);
    if !done.is_empty() {
        store.write(|w| {
            for (p, _) in &done {
                w.upsert_file(&row_of(p))?;
            }
            Ok(())
        })?;
        for (p, _) in &done {
            if p.existed {
                summary.updated += 1;
            } else {
                summary.added += 1;
            }
        }
        run.progress.inc(done.len() as u64);
    }
    Ok(todo.into_iter().map(|x| x.0).collect())
}

fn embed_pending(
    catalog: &mut dyn Store,
    run: &Run,
    todo: Vec<Pending>,
    summary: &mut Summary,
) -> Result<()> {
    let (videos, todo): (Vec<Pending>, Vec<Pending>) =
        todo.into_iter().partition(|p| is_video(&p.found.path));
    for p in videos {
        embed_video(catalog, run, p, summary)?;
        run.progress.inc(1);
    }
    if todo.is_empty() {
        return Ok(());
    }
    let (encoder, model_id, progress) = (run.encoder, run.model_id, run.progress);
    let proc = encoder.image_processor();
    let mut seen: HashSet<Hash> = HashSet::new();
    // Decoding runs one batch ahead of the encoder on a worker thread.
    pipeline::prepare_ahead(
        pipeline::batches(todo, run.batch_size),
        |_, _, p: &Pending| {
            let b = std::fs::read(&p.found.path).map_err(|e| Error::io(&p.found.path, e))?;
            proc.process_pixels(&decode_image(&b, &p.found.path)?)
        },
        |batch| {
            let n = batch.len();
            let mut pixels = Vec::new();
            let mut ok: Vec<Pending> = Vec::new();
            let mut failed: Vec<Pending> = Vec::new();
            let mut dups: Vec<Pending> = Vec::new();
            for (mut p, r) in batch {
                match r {
                    Ok(px) => {
                        let h = p.hash.unwrap();
                        if seen.contains(&h) || ok.iter().any(|o| o.hash == Some(h)) {
                            dups.push(p);
                        } else {
                            ok.push(p);
                            pixels.push(px);
                        }
                    }
                    Err(e) => {
                        p.error = Some(e.to_string());
                        failed.push(p);
                    }
                }
            }
            let vectors = if pixels.is_empty() {
                Vec::new()
            } else {
                encoder.embed_images(&pixels)?
            };
            catalog.write(|w| {
                for (p, v) in ok.iter().zip(&vectors) {
                    w.put_vector(model_id, p.hash.as_ref().unwrap(), v)?;
                    w.upsert_file(&row_of(p))?;
                }
                for p in dups.iter().chain(&failed) {
                    w.upsert_file(&row_of(p))?;
                }
                Ok(())
            })?;
            summary.embedded += ok.len();
            for p in ok.iter().chain(&dups) {
                seen.insert(p.hash.unwrap());
                if p.existed {
                    summary.updated += 1;
                } else {
                    summary.added += 1;
                }
            }
            for p in failed {
                summary.failed.push((
                    p.found.path.display().to_string(),
                    p.error.unwrap_or_default(),
                ));
            }
            progress.inc(n as u64);
            Ok(true)
        },
    )?;
    Ok(())
}

/// Embeds one video (whole and in segments) and writes its rows and
/// vectors in one transaction, replacing the segments it had; a video that
/// cannot be read keeps a row with the reason.
fn embed_video(store: &mut dyn Store, run: &Run, p: Pending, summary: &mut Summary) -> Result<()> {
    let opts = run.video.unwrap_or_default();
    let mut row = row_of(&p);
    let old = run.old_segments.get(&row.path).cloned().unwrap_or_default();
    let hash = p.hash.expect("hashed before embedding");
    let r = vs::embed(run.encoder, &p.found.path, &opts, run.batch_size);
    if let Err(e) = &r {
        row.error = Some(e.to_string());
    }
    store.write(|w| {
        for s in &old {
            w.remove_file(s)?;
        }
        if let Ok(v) = &r {
            w.put_vector(run.model_id, &hash, &v.mean)?;
            for s in &v.segments {
                let h = vs::segment_hash(&hash, s.start, s.end);
                w.put_vector(run.model_id, &h, &s.vector)?;
                w.upsert_file(&FileRow {
                    path: vs::segment_path(&row.path, s.start, s.end),
                    size: row.size,
                    mtime_ns: row.mtime_ns,
                    hash: Some(h),
                    error: None,
                    caption: String::new(),
                })?;
            }
        }
        w.upsert_file(&row)
    })?;
    match r {
        Ok(v) => {
            summary.embedded += 1;
            summary.segments += v.segments.len();
            if p.existed {
                summary.updated += 1;
            } else {
                summary.added += 1;
            }
        }
        Err(e) => summary.failed.push((row.path, e.to_string())),
    }
    Ok(())
}

/// Paths under `dir` as stored (canonical).
pub fn canonical_prefix(dir: &Path) -> Result<String> {
    Ok(walk::canonical_root(dir)?.to_string_lossy().into_owned())
}
