//! `clasp eval retrieval -m BLIP2_FOLDER`: BLIP-2's own two stages, ITC (the
//! best query's cosine with the caption) and, with `--rerank`, its ITM head
//! on the top K, with the folder as its own fusion model.

use super::*;

pub(super) fn blip2_retrieval(a: RetrievalArgs) -> Result<ExitCode> {
    let t0 = Instant::now();
    let model = Path::new(&a.common.model);
    let first = load_fusion(model, &a.common)?;
    // The folder re-ranks its own candidates unless another is named.
    let other = match &a.rerank_model {
        Some(m) if a.rerank.is_some() => Some(load_fusion(m, &a.common)?),
        _ => None,
    };
    let fusion = other.as_ref().unwrap_or(&first);
    let (_, set) = load_pairs(&a.pairs, Lang::En)?;
    let bar = BarProgress::default();
    let scores = eval::rerank::itc_scores(&first, &set, a.common.batch_size, &bar)?;
    let n = set.images.len();
    let (t2i, i2t) = eval::metrics::retrieval_ranks(&scores, n, &set.caption_image);
    let m = eval::RetrievalMetrics::from_ranks(&t2i, &i2t, &RECALL_KS);
    let secs = t0.elapsed().as_secs_f64();
    let reranked = match &a.rerank {
        Some(how) => Some(rerank_with(
            fusion,
            &set,
            &scores,
            (&t2i, &i2t),
            *how,
            &bar,
        )?),
        None => None,
    };
    let mut o = Map::new();
    for (k, v) in m.to_pairs() {
        o.insert(k, json!(v));
    }
    if let Some(v) = &reranked {
        o.insert("reranked".into(), v.clone());
    }
    o.insert("first_stage".into(), json!("itc"));
    o.insert("n_images".into(), json!(n));
    o.insert("n_texts".into(), json!(set.captions.len()));
    o.insert("dataset".into(), json!(set.name));
    o.insert("model".into(), json!(a.common.model));
    o.insert("seconds".into(), json!(secs));
    if a.common.json {
        print_json(o)?;
    } else {
        let pct = |v: f64| format!("{:.2}%", v * 100.0);
        println!(
            "{}: {n} images, {} texts, BLIP-2 ITC ({secs:.1} s)",
            set.name,
            set.captions.len()
        );
        for (label, rec) in [
            ("text→image", &m.image_retrieval_recall),
            ("image→text", &m.text_retrieval_recall),
        ] {
            let cells: Vec<String> = rec
                .iter()
                .map(|(k, v)| format!("R@{k} {}", pct(*v)))
                .collect();
            println!("{label:<12} {}", cells.join("  "));
        }
        println!("mean recall {}", pct(m.mean_recall));
        if let Some(v) = &reranked {
            println!(
                "re-ranked by ITM ({} candidates): text→image R@1 {}, image→text R@1 {}, mean recall {}",
                v["candidates"],
                pct(v["image_retrieval_recall@1"].as_f64().unwrap_or(0.0)),
                pct(v["text_retrieval_recall@1"].as_f64().unwrap_or(0.0)),
                pct(v["mean_recall"].as_f64().unwrap_or(0.0)),
            );
        }
    }
    report_issues(&set.issues, a.common.json);
    Ok(exit_for(&set.issues))
}
