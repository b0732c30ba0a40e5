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
    /// Samples a part holds at most; a WebDataset's shard also ends a part.
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
    let set = clasp::data::load_pairs(&spec, split, clasp::data::Lang::En, None)?;
    for i in &set.issues {
        eprintln!("warning: {i}");
    }
    let dir = b.output_dir.clone().expect("clap requires --output-dir");
    // One sample an image: the image and its first caption.
    let mut first = vec![usize::MAX; set.images.len()];
    for (c, &img) in set.caption_image.iter().enumerate().rev() {
        first[img] = c;
    }
    let groups: Option<Vec<usize>> = (spec.format == clasp::data::Format::WebDataset).then(|| {
        let mut shards: Vec<String> = Vec::new();
        set.images
            .iter()
            .map(|s| {
                let name = match s {
                    clasp::data::ImageSource::TarMember { shard, .. } => {
                        shard.display().to_string()
                    }
                    other => other.display_name(),
                };
                if shards.last() != Some(&name) {
                    shards.push(name);
                }
                shards.len() - 1
            })
            .collect()
    });
    let parts = plan_parts(set.images.len(), b.part_size, groups.as_deref());
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
        let sources: Vec<_> = parts[p].iter().map(|&i| set.images[i].clone()).collect();
        let r = encoder.embed_image_sources(&sources, a.batch_size, |n| pb.inc(n as u64))?;
        for f in &r.failures {
            failed += 1;
            pb.suspend(|| eprintln!("error: {}", f.error));
        }
        // The samples whose image was embedded, in order.
        let kept: Vec<usize> = r.indices.iter().map(|&k| parts[p][k]).collect();
        let captions: Vec<String> = kept
            .iter()
            .map(|&i| set.captions[first[i]].clone())
            .collect();
        let texts = encoder.embed_text_batches(&captions, a.batch_size, |_| {})?;
        // clip-retrieval's `image_path`: a WebDataset sample's key, a file's path.
        let paths: Vec<String> = kept
            .iter()
            .map(|&i| {
                let src = &set.images[i];
                src.sample_key().unwrap_or_else(|| src.display_name())
            })
            .collect();
        write_part(
            &dir,
            p,
            parts.len(),
            &PartRows {
                images: &r.embeddings,
                texts: &texts,
                image_paths: &paths,
                captions: &captions,
            },
        )?;
    }
    pb.finish_and_clear();
    note!(
        "wrote {} parts into {} ({failed} images failed and were left out)",
        mine.len(),
        dir.display()
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
