//! `clasp embed --dataset SPEC --output-dir DIR`: a whole dataset's image
//! and caption embeddings in clip-retrieval's layout
//! (`clasp::index::clip_retrieval`), part by part, resumable, and split among
//! independent workers by `--worker I/N`.

use super::*;
use clasp::index::clip_retrieval::{part_done, plan_parts, write_part, PartRows};

#[derive(clap::Args, Debug, Default)]
pub struct BulkArgs {
    /// Embed a dataset (FORMAT:PATH, e.g. `wds:shards/{000..099}.tar`): each image with its
    /// first caption, written into --output-dir in clip-retrieval's layout.
    #[arg(long, requires = "output_dir", conflicts_with_all = ["images", "images_from", "texts", "texts_from", "videos", "output", "similarity"])]
    pub dataset: Option<String>,
    /// The dataset's split.
    #[arg(long, default_value = "all", requires = "dataset")]
    pub split: String,
    /// Where the layout goes: img_emb/, text_emb/ and metadata/.
    #[arg(long, requires = "dataset")]
    pub output_dir: Option<PathBuf>,
    /// The output layout (clip-retrieval's is the one there is).
    #[arg(long, default_value = "clip-retrieval", value_parser = ["clip-retrieval"], requires = "dataset")]
    pub layout: String,
    /// Samples a part holds at most; a WebDataset's shard also ends a part (its shards are
    /// read one at a time, so memory holds one shard's index whatever their number).
    #[arg(long, default_value_t = 10_000, requires = "dataset")]
    pub part_size: usize,
    /// This worker's share, I/N (from 0): the parts whose number is I modulo N.
    #[arg(long, value_name = "I/N", requires = "dataset")]
    pub worker: Option<String>,
}

fn parse_worker(w: Option<&str>) -> Result<(usize, usize)> {
    let Some(w) = w else { return Ok((0, 1)) };
    let parsed = w
        .split_once('/')
        .and_then(|(i, n)| Some((i.trim().parse().ok()?, n.trim().parse().ok()?)));
    match parsed {
        Some((i, n)) if n > 0 && i < n => Ok((i, n)),
        _ => bail!("--worker {w}: expected I/N with 0 <= I < N, e.g. 0/4"),
    }
}

pub fn run(a: &EmbedArgs) -> Result<ExitCode> {
    let b = &a.bulk;
    let (me, workers) = parse_worker(b.worker.as_deref())?;
    let spec = clasp::data::DatasetSpec::parse(b.dataset.as_deref().unwrap_or_default())?;
    let split = clasp::data::Split::parse(&b.split)?;
    let dir = b.output_dir.clone().expect("clap requires --output-dir");
    if spec.format == clasp::data::Format::WebDataset {
        return run_shards(a, &spec, split, (me, workers), &dir);
    }
    let set = clasp::data::load_pairs(&spec, split, clasp::data::Lang::En, None)?;
    for i in &set.issues {
        eprintln!("warning: {i}");
    }
    let parts = plan_parts(set.images.len(), b.part_size, None);
    let mine: Vec<usize> = (0..parts.len())
        .filter(|p| p % workers == me && !part_done(&dir, *p, parts.len()))
        .collect();
    note!(
        "{}: {} samples in {} parts; worker {me}/{workers} has {} left",
        set.name,
        set.images.len(),
        parts.len(),
        mine.len()
    );
    if mine.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    let encoder = super::encoder_for(a)?;
    let total: usize = mine.iter().map(|&p| parts[p].len()).sum();
    let pb = progress_bar(total as u64, "samples");
    let mut failed = 0;
    for &p in &mine {
        let part = Part {
            number: p,
            of: parts.len(),
            rows: &parts[p],
        };
        failed += embed_part(&encoder, &set, part, a.batch_size, &dir, &pb)?;
    }
    done(&pb, mine.len(), &dir, failed, 0)
}

/// A WebDataset, a shard at a time: a first pass counts each shard's
/// samples (so the parts, a shard's samples split at --part-size, and their
/// names are those of the whole set), then each of this worker's parts reads
/// its shard again. Only one shard's index is ever in memory, whatever the
/// number of shards.
fn run_shards(
    a: &EmbedArgs,
    spec: &clasp::data::DatasetSpec,
    split: clasp::data::Split,
    (me, workers): (usize, usize),
    dir: &std::path::Path,
) -> Result<ExitCode> {
    let pattern = spec.path.to_string_lossy().into_owned();
    let shards = clasp::data::expand_braces(&pattern)?;
    let load = |k: usize| {
        let one = clasp::data::DatasetSpec {
            format: clasp::data::Format::WebDataset,
            path: PathBuf::from(&shards[k]),
        };
        clasp::data::load_pairs(&one, split, clasp::data::Lang::En, None)
    };
    // (shard, first sample, end) of each part, in the whole set's order.
    let mut parts: Vec<(usize, usize, usize)> = Vec::new();
    for (k, shard) in shards.iter().enumerate() {
        // A shard that yields nothing is said now: no part will read it again.
        let n = match load(k) {
            Ok(set) if set.images.is_empty() => {
                set.issues.iter().for_each(|i| eprintln!("warning: {i}"));
                0
            }
            Ok(set) => set.images.len(),
            Err(e) => {
                eprintln!("warning: {shard}: {e}");
                0
            }
        };
        let mut at = 0;
        while at < n {
            let end = (at + a.bulk.part_size.max(1)).min(n);
            parts.push((k, at, end));
            at = end;
        }
    }
    let mine: Vec<usize> = (0..parts.len())
        .filter(|p| p % workers == me && !part_done(dir, *p, parts.len()))
        .collect();
    let samples: usize = parts.iter().map(|p| p.2 - p.1).sum();
    note!(
        "wds:{pattern}: {samples} samples of {} shards in {} parts; worker {me}/{workers} has {} left",
        shards.len(),
        parts.len(),
        mine.len()
    );
    if mine.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    let encoder = super::encoder_for(a)?;
    let total: usize = mine.iter().map(|&p| parts[p].2 - parts[p].1).sum();
    let pb = progress_bar(total as u64, "samples");
    let (mut failed, mut unread) = (0, 0);
    let mut open: Option<(usize, clasp::data::PairSet)> = None;
    for &p in &mine {
        let (k, from, to) = parts[p];
        if open.as_ref().is_none_or(|(o, _)| *o != k) {
            match load(k) {
                Ok(set) => {
                    for i in &set.issues {
                        pb.suspend(|| eprintln!("warning: {i}"));
                    }
                    open = Some((k, set));
                }
                Err(e) => {
                    // Counted once, gone now: its part is left for a rerun.
                    unread += 1;
                    pb.suspend(|| eprintln!("error: {}: {e}", shards[k]));
                    continue;
                }
            }
        }
        let set = &open.as_ref().expect("the shard is open").1;
        let rows: Vec<usize> = (from..to.min(set.images.len())).collect();
        let part = Part {
            number: p,
            of: parts.len(),
            rows: &rows,
        };
        failed += embed_part(&encoder, set, part, a.batch_size, dir, &pb)?;
    }
    done(&pb, mine.len() - unread, dir, failed, unread)
}

/// Part `number` of `of`: the samples `rows` of its set.
struct Part<'a> {
    number: usize,
    of: usize,
    rows: &'a [usize],
}

/// Embeds a part's images and their first captions and writes it; returns
/// how many images failed (named on stderr and left out).
fn embed_part(
    encoder: &clasp::Encoder,
    set: &clasp::data::PairSet,
    part: Part,
    batch_size: usize,
    dir: &std::path::Path,
    pb: &indicatif::ProgressBar,
) -> Result<usize> {
    // One sample an image: the image and its first caption.
    let mut first = vec![usize::MAX; set.images.len()];
    for (c, &img) in set.caption_image.iter().enumerate().rev() {
        first[img] = c;
    }
    let sources: Vec<_> = part.rows.iter().map(|&i| set.images[i].clone()).collect();
    let r = encoder.embed_image_sources(&sources, batch_size, |n| pb.inc(n as u64))?;
    for f in &r.failures {
        pb.suspend(|| eprintln!("error: {}", f.error));
    }
    // The samples whose image was embedded, in order.
    let kept: Vec<usize> = r.indices.iter().map(|&k| part.rows[k]).collect();
    let captions: Vec<String> = kept
        .iter()
        .map(|&i| set.captions[first[i]].clone())
        .collect();
    let texts = encoder.embed_text_batches(&captions, batch_size, |_| {})?;
    // clip-retrieval's `image_path`: a WebDataset sample's key, a file's path.
    let paths: Vec<String> = kept
        .iter()
        .map(|&i| {
            let src = &set.images[i];
            src.sample_key().unwrap_or_else(|| src.display_name())
        })
        .collect();
    write_part(
        dir,
        part.number,
        part.of,
        &PartRows {
            images: &r.embeddings,
            texts: &texts,
            image_paths: &paths,
            captions: &captions,
        },
    )?;
    Ok(r.failures.len())
}

/// Says what was written; exit status 1 when an image or a shard failed.
fn done(
    pb: &indicatif::ProgressBar,
    written: usize,
    dir: &std::path::Path,
    failed: usize,
    unread: usize,
) -> Result<ExitCode> {
    pb.finish_and_clear();
    let shards = if unread > 0 {
        format!("; {unread} parts' shards could not be read and are left for a rerun")
    } else {
        String::new()
    };
    note!(
        "wrote {written} parts into {} ({failed} images failed and were left out{shards})",
        dir.display()
    );
    Ok(if failed == 0 && unread == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
