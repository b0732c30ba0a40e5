//! BLIP-2's Q-Former against transformers (scripts/gen_blip2_fixtures.py):
//! the Q-Former of Salesforce/blip2-itm-vit-g at its real sizes, with
//! weights both sides compute (scripts/formula.py's `hashed`), fed the same
//! image features; its query outputs, ITC embeddings and scores and ITM
//! logits as `Blip2ForImageTextRetrieval` computes them.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use clasp::model::qformer::{QFormerConfig, QFormerHeads};
use common::max_abs;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/blip2/itm")
}

fn heads() -> QFormerHeads {
    let dir = fixtures();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let q: QFormerConfig = serde_json::from_value(cfg["qformer_config"].clone()).unwrap();
    let tensors = common::manifest_tensors(&dir.join("manifest.json"), common::hashed);
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    QFormerHeads::load(
        vb,
        &q,
        cfg["num_query_tokens"].as_u64().unwrap() as usize,
        cfg["image_text_hidden_size"].as_u64().unwrap() as usize,
    )
    .unwrap()
}

/// The two images' features, as the script makes them.
fn image() -> Tensor {
    let parts: Vec<Tensor> = (0..2)
        .map(|i| (common::hashed(&format!("image_embedding.{i}"), &[257, 1408]) * 10.0).unwrap())
        .collect();
    Tensor::stack(&parts, 0).unwrap()
}

#[test]
fn qformer_queries_itc_and_itm_match_transformers() {
    let (exp, _) = common::expected_with_meta(&fixtures().join("expected.safetensors"));
    let heads = heads();
    let image = image();
    let ids = exp["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = exp["attention_mask"].to_dtype(DType::F32).unwrap();

    // The queries' last hidden state.
    let tokens = heads.query_tokens().clone();
    let q = heads.qformer.queries(&tokens, &image).unwrap();
    let d = max_abs(&q.narrow(2, 0, 16).unwrap(), &exp["queries_head"]);
    assert!(d < 1e-4, "query outputs differ by {d}");
    let d = max_abs(&q.sum(2).unwrap(), &exp["queries_rowsum"]);
    assert!(d < 1e-3, "query output row sums differ by {d}");

    // ITC: per-query image embeddings, [CLS] text embeddings, max over queries.
    let img = heads.image_embeds(&image).unwrap();
    let d = max_abs(&img, &exp["image_embeds"]);
    assert!(d < 1e-4, "ITC image embeddings differ by {d}");
    let txt = heads.text_embeds(&ids, &mask).unwrap();
    let d = max_abs(&txt, &exp["text_embeds"]);
    assert!(d < 1e-4, "ITC text embeddings differ by {d}");
    let itc = QFormerHeads::itc(&img, &txt).unwrap();
    let d = max_abs(&itc, &exp["itc"]);
    assert!(d < 1e-4, "ITC scores differ by {d}");

    // ITM: every image with every text (transformers pairs rows).
    let n = ids.dim(0).unwrap();
    let per_image: Vec<Tensor> = (0..2)
        .map(|i| {
            let img = image
                .narrow(0, i, 1)
                .unwrap()
                .broadcast_as((n, 257, 1408))
                .unwrap()
                .contiguous()
                .unwrap();
            heads.itm(&img, &ids, &mask).unwrap()
        })
        .collect();
    let itm = Tensor::stack(&per_image, 0).unwrap();
    let d = max_abs(&itm, &exp["itm"]);
    assert!(d < 1e-4, "ITM logits differ by {d}");
    eprintln!("ITM logits within {d:e} of transformers");
    // The fixture discriminates: the scores are not one number repeated.
    let spread = |t: &Tensor| {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v.iter().cloned().fold(f32::MIN, f32::max) - v.iter().cloned().fold(f32::MAX, f32::min)
    };
    assert!(spread(&exp["itc"]) > 0.02 && spread(&exp["itm"]) > 0.05);
}

#[test]
fn qformer_refuses_image_features_of_the_wrong_width() {
    let heads = heads();
    let wrong = Tensor::zeros((1, 49, 1280), DType::F32, &Device::Cpu).unwrap();
    let err = heads
        .qformer
        .queries(heads.query_tokens(), &wrong)
        .unwrap_err()
        .to_string();
    assert!(err.contains("1408") && err.contains("1280"), "{err}");
}

#[test]
fn blip2_retrieval_folder_scores_photos_as_transformers() {
    use clasp::model::blip2::Blip2Retrieval;
    let d = tempfile::tempdir().unwrap();
    common::blip2_small_folder(d.path());
    let model = Blip2Retrieval::load(d.path(), &Device::Cpu).unwrap();
    let src = fixtures().parent().unwrap().join("small");
    let (exp, meta) = common::expected_with_meta(&src.join("expected.safetensors"));
    let photos: Vec<String> = serde_json::from_str(&meta["photos"]).unwrap();
    let texts: Vec<String> = serde_json::from_str(&meta["texts"]).unwrap();
    let flickr = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/flickr8k/images");

    // BlipImageProcessor's pixels (checked by channel means and a corner).
    let pixels: Vec<Tensor> = photos
        .iter()
        .map(|p| {
            let px = model.processor.process_path(&flickr.join(p)).unwrap();
            Tensor::from_vec(px, (3, 224, 224), &Device::Cpu).unwrap()
        })
        .collect();
    let pixels = Tensor::stack(&pixels, 0).unwrap();
    let means = pixels.mean((2, 3)).unwrap();
    assert!(max_abs(&means, &exp["pixel_means"]) < 1e-4);
    let corner = pixels.narrow(2, 0, 8).unwrap().narrow(3, 0, 8).unwrap();
    assert!(max_abs(&corner, &exp["pixel_corner"]) < 1e-4);

    // The token ids, then ITC (max over queries) and ITM of every pair.
    let ids = model.tokenizer.encode(&texts).unwrap();
    let want = exp["input_ids"].to_dtype(DType::U32).unwrap();
    let (got, _) = ids.to_tensors(true, &Device::Cpu).unwrap();
    assert_eq!(
        got.to_vec2::<u32>().unwrap(),
        want.to_vec2::<u32>().unwrap()
    );
    let feats = model.image_features(&pixels).unwrap();
    let img = model.heads.image_embeds(&feats).unwrap();
    let txt = model.text_embeds(&texts).unwrap();
    let itc = QFormerHeads::itc(&img, &txt).unwrap();
    let d_itc = max_abs(&itc, &exp["itc"]);
    assert!(d_itc < 1e-4, "ITC scores differ by {d_itc}");
    let itm: Vec<Tensor> = (0..2)
        .map(|i| {
            model
                .itm_logits(&feats.narrow(0, i, 1).unwrap(), &texts)
                .unwrap()
        })
        .collect();
    let d_itm = max_abs(&Tensor::stack(&itm, 0).unwrap(), &exp["itm"]);
    assert!(d_itm < 1e-4, "ITM logits differ by {d_itm}");
    eprintln!("photos to ITC within {d_itc:e}, ITM within {d_itm:e} of transformers");
}

#[test]
fn search_reranks_its_top_hits_with_the_itm_head_as_transformers_scores_them() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("blip2");
    std::fs::create_dir(&model).unwrap();
    common::blip2_small_folder(&model);
    let src = fixtures().parent().unwrap().join("small");
    let (exp, meta) = common::expected_with_meta(&src.join("expected.safetensors"));
    let photos: Vec<String> = serde_json::from_str(&meta["photos"]).unwrap();
    let texts: Vec<String> = serde_json::from_str(&meta["texts"]).unwrap();
    let flickr = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/flickr8k/images");
    let dir = d.path().join("photos");
    std::fs::create_dir(&dir).unwrap();
    for p in &photos {
        std::fs::copy(flickr.join(p), dir.join(p)).unwrap();
    }
    // transformers' match probability of each photo with the first caption.
    let itm: Vec<Vec<Vec<f32>>> = exp["itm"].to_vec3().unwrap();
    let want: Vec<f64> = itm
        .iter()
        .map(|per_text| {
            let l = &per_text[0];
            1.0 / (1.0 + ((l[0] - l[1]) as f64).exp())
        })
        .collect();
    let store = d.path().join("s.sqlite");
    let tiny = common::tiny();
    let hits = common::ok(&common::clasp(&[
        "search",
        &texts[0],
        "-k",
        "2",
        "-m",
        &tiny,
        "--store",
        store.to_str().unwrap(),
        "--dir",
        dir.to_str().unwrap(),
        "--rerank",
        "itm:2",
        "--rerank-model",
        model.to_str().unwrap(),
        "--json",
    ]));
    let hits = hits.as_array().unwrap();
    assert_eq!(hits.len(), 2, "{hits:?}");
    let got: Vec<(String, f64)> = hits
        .iter()
        .map(|h| {
            let name = Path::new(h["path"].as_str().unwrap())
                .file_name()
                .unwrap()
                .to_string_lossy()
                .to_string();
            (name, h["itm"].as_f64().unwrap())
        })
        .collect();
    for (name, p) in &got {
        let i = photos.iter().position(|q| q == name).unwrap();
        assert!((p - want[i]).abs() < 1e-4, "{name}: ITM {p} vs {}", want[i]);
    }
    assert!(got[0].1 >= got[1].1, "not ordered by ITM: {got:?}");

    // `clasp serve --rerank-model` answers /v1/search the same way.
    let server = common::Server::start(&[
        "serve",
        "-m",
        &tiny,
        "--store",
        store.to_str().unwrap(),
        "--rerank-model",
        model.to_str().unwrap(),
        "--addr",
        "127.0.0.1:0",
    ]);
    let (status, v, _) = server.post(
        "/v1/search",
        &serde_json::json!({"query": texts[0], "k": 2, "rerank": "itm:2"}),
    );
    assert_eq!(status, 200, "{v}");
    let served: Vec<f64> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["itm"].as_f64().unwrap())
        .collect();
    let cli: Vec<f64> = got.iter().map(|(_, p)| *p).collect();
    assert!(
        served.iter().zip(&cli).all(|(a, b)| (a - b).abs() < 1e-6),
        "{served:?} vs {cli:?}"
    );
    let (status, v, _) = server.post(
        "/v1/search",
        &serde_json::json!({"query": texts[0], "rerank": "cosine"}),
    );
    assert_eq!(status, 400, "{v}");
    drop(server);

    // Without a fusion model the option is refused by name.
    let refused = |extra: &[&str], needle: &str| {
        let mut args = vec![
            "search",
            &texts[0],
            "-m",
            &tiny,
            "--store",
            store.to_str().unwrap(),
            "--dir",
            dir.to_str().unwrap(),
            "--no-index",
            "--rerank",
            "itm",
        ];
        args.extend(extra);
        let out = common::clasp(&args);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains(needle));
    };
    refused(&[], "--rerank-model");
    refused(&["--rerank-model", &tiny], "not a fusion model");
}

type Vars = std::collections::HashMap<String, candle_core::Var>;

/// small/'s Q-Former and heads over `Var`s (so gradients reach them), with
/// `extra` tensors (name, shape) made by `hashed` too.
fn var_heads(
    src: &Path,
    extra: &[(String, Vec<usize>)],
) -> (clasp::model::blip2::Blip2Config, Vars, QFormerHeads) {
    let cfg = clasp::model::blip2::Blip2Config::from_file(&src.join("config.json")).unwrap();
    let mut tensors = common::manifest_tensors(&src.join("manifest.json"), common::hashed);
    for (k, shape) in extra {
        tensors.insert(k.clone(), common::hashed(k, shape));
    }
    let vars: Vars = tensors
        .into_iter()
        .filter(|(k, _)| !k.starts_with("vision_model."))
        .map(|(k, t)| (k, candle_core::Var::from_tensor(&t).unwrap()))
        .collect();
    let vb = VarBuilder::from_tensors(
        vars.iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect(),
        DType::F32,
        &Device::Cpu,
    );
    let heads = QFormerHeads::load(
        vb,
        &cfg.qformer_config,
        cfg.num_query_tokens,
        cfg.image_text_hidden_size,
    )
    .unwrap();
    (cfg, vars, heads)
}

/// The stage-1 fixtures' four photo rows (rows 1 and 2 the same photo).
fn stage1_images(h: usize, ids: &[usize]) -> Tensor {
    let photos: Vec<Tensor> = (0..3)
        .map(|i| (common::hashed(&format!("stage1.image.{i}"), &[257, h]) * 10.0).unwrap())
        .collect();
    Tensor::stack(&ids.iter().map(|&i| &photos[i]).collect::<Vec<_>>(), 0).unwrap()
}

/// BLIP-2's stage-1 ITC and ITM (crates/train's `qformer_stage1`) against
/// LAVIS's `Blip2Qformer.forward` transcribed on transformers' modules
/// (scripts/gen_blip2_fixtures.py stage1): a batch with padding and a photo
/// twice; the negatives' weights, the losses and the gradients of the
/// temperature, the query tokens, the ITM head and a Q-Former weight.
#[test]
fn stage1_itc_and_itm_losses_and_gradients_equal_lavis() {
    use clasp::train::qformer_stage1::itc_itm;
    let src = fixtures().parent().unwrap().join("small");
    let (f, meta) = common::expected_with_meta(&src.join("stage1.safetensors"));
    let (cfg, vars, heads) = var_heads(&src, &[]);
    let image_ids: Vec<usize> = f["image_ids"]
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&i| i as usize)
        .collect();
    let image = stage1_images(cfg.vision_config.hidden_size, &image_ids);
    let ids = f["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = f["attention_mask"].to_dtype(DType::F32).unwrap();
    let texts: Vec<String> = serde_json::from_str(&meta["texts"]).unwrap();
    assert_eq!(ids.dim(0).unwrap(), texts.len());
    let temp = candle_core::Var::new(0.07f32, &Device::Cpu).unwrap();
    // The reference's draws, in its order: each caption's photo, then each
    // photo's caption.
    let mut drawn: std::collections::VecDeque<usize> = f["neg_image"]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .chain(f["neg_text"].to_vec1::<i64>().unwrap())
        .map(|i| i as usize)
        .collect();
    let mut draw = |w: &[f32]| {
        let i = drawn.pop_front().unwrap();
        assert!(w[i] > 0.0, "drew a zero-weight negative");
        i
    };
    let _graph = clasp::model::grad_mode_guard(true);
    let out = itc_itm(
        &heads,
        &image,
        &image_ids,
        &ids,
        &mask,
        temp.as_tensor(),
        &mut draw,
    )
    .unwrap();
    let to_t = |v: &Vec<Vec<f32>>| Tensor::new(v.clone(), &Device::Cpu).unwrap();
    for (got, key, tol) in [
        (out.itc.reshape(1).unwrap(), "loss_itc", 1e-5),
        (out.itm.reshape(1).unwrap(), "loss_itm", 1e-5),
        (to_t(&out.weights_t2i), "weights_t2i", 1e-5),
        (to_t(&out.weights_i2t), "weights_i2t", 1e-5),
        (out.itm_logits.clone(), "itm_logits", 1e-5),
    ] {
        let d = max_abs(&got, &f[key]);
        assert!(d < tol, "{key} differs by {d}");
    }
    // Same-photo pairs are never negatives.
    assert_eq!(out.weights_t2i[1][2], 0.0);
    let grads = (&out.itc + &out.itm).unwrap().backward().unwrap();
    let grad = |v: &candle_core::Var| grads.get(v.as_tensor()).unwrap().clone();
    let qkey = &meta["qformer_key"];
    for (got, key) in [
        (grad(&temp).reshape(1).unwrap(), "grad_temp"),
        (grad(&vars["query_tokens"]), "grad_query_tokens"),
        (grad(&vars["itm_head.weight"]), "grad_itm_head"),
        (grad(&vars[qkey.as_str()]), "grad_qformer_key"),
    ] {
        let scale = common::max_abs(&f[key], &f[key].zeros_like().unwrap()).max(1e-3);
        let d = max_abs(&got, &f[key]);
        assert!(d / scale < 1e-4, "{key} differs by {d} (of {scale})");
    }
}

/// BLIP-2's stage-1 ITG (the Q-Former's captioning loss, `QFormerHeads::
/// itg_loss`: one pass over queries and caption under BLIP-2's mask) against
/// LAVIS's way (scripts/gen_blip2_fixtures.py itg: the queries' pass caches
/// their keys and values, the caption then reads them causally): loss,
/// logits and gradients.
#[test]
fn stage1_itg_loss_and_gradients_equal_lavis() {
    let src = fixtures().parent().unwrap().join("small");
    let (f, meta) = common::expected_with_meta(&src.join("itg.safetensors"));
    let shapes: std::collections::BTreeMap<String, Vec<usize>> =
        serde_json::from_str(&meta["head_shapes"]).unwrap();
    let extra: Vec<(String, Vec<usize>)> = shapes.into_iter().collect();
    let (cfg, vars, heads) = var_heads(&src, &extra);
    let image = stage1_images(cfg.vision_config.hidden_size, &[0, 1, 1, 2]);
    let ids = f["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = f["attention_mask"].to_dtype(DType::F32).unwrap();
    let bos: u32 = meta["bos"].parse().unwrap();
    let _graph = clasp::model::grad_mode_guard(true);
    let (loss, logits) = heads.itg_loss(&image, &ids, &mask, bos).unwrap();
    let d = max_abs(&loss.reshape(1).unwrap(), &f["loss_itg"]);
    assert!(d < 1e-5, "ITG loss differs by {d}");
    let d = max_abs(&logits.narrow(2, 0, 16).unwrap(), &f["logits_head"]);
    assert!(d < 1e-4, "ITG logits differ by {d}");
    let grads = loss.backward().unwrap();
    for (name, key) in [
        ("query_tokens", "grad_query_tokens"),
        ("cls.predictions.transform.dense.weight", "grad_lm_dense"),
        (meta["text_ffn"].as_str(), "grad_text_ffn"),
    ] {
        let got = grads.get(vars[name].as_tensor()).unwrap();
        let scale = max_abs(&f[key], &f[key].zeros_like().unwrap()).max(1e-6);
        let d = max_abs(got, &f[key]);
        assert!(d / scale < 1e-4, "{key} differs by {d} (of {scale})");
    }
}

/// The fixture's two photos and three captions as a pair set beside a
/// small BLIP-2 folder: (folder, pairs.tsv, transformers' outputs), caption
/// j belonging to photo OWNER[j].
fn small_pairs(d: &Path) -> (PathBuf, PathBuf, std::collections::HashMap<String, Tensor>) {
    let model = d.join("blip2");
    std::fs::create_dir(&model).unwrap();
    common::blip2_small_folder(&model);
    let src = fixtures().parent().unwrap().join("small");
    let (exp, meta) = common::expected_with_meta(&src.join("expected.safetensors"));
    let photos: Vec<String> = serde_json::from_str(&meta["photos"]).unwrap();
    let texts: Vec<String> = serde_json::from_str(&meta["texts"]).unwrap();
    let flickr = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/flickr8k/images");
    for p in &photos {
        std::fs::copy(flickr.join(p), d.join(p)).unwrap();
    }
    let mut tsv = String::from("image\tcaption\n");
    for (j, t) in texts.iter().enumerate() {
        tsv.push_str(&format!("{}\t{t}\n", photos[OWNER[j]]));
    }
    let pairs = d.join("pairs.tsv");
    std::fs::write(&pairs, tsv).unwrap();
    (model, pairs, exp)
}

const OWNER: [usize; 3] = [0, 1, 0];

/// R@1 of both directions when photo i and caption j score `s(i, j)`:
/// (text→image, image→text).
fn recall_at_1(s: impl Fn(usize, usize) -> f64) -> (f64, f64) {
    let t2i = (0..3)
        .filter(|&j| s(OWNER[j], j) > s(1 - OWNER[j], j))
        .count() as f64
        / 3.0;
    let i2t = (0..2)
        .filter(|&i| {
            let best = (0..3).max_by(|&a, &b| s(i, a).total_cmp(&s(i, b))).unwrap();
            OWNER[best] == i
        })
        .count() as f64
        / 2.0;
    (t2i, i2t)
}

/// `clasp eval retrieval --rerank itm:K`: with K at least the photos and the
/// captions, both directions are ordered by the ITM head alone, so its
/// recall@1 follows from transformers' ITM logits of the same pairs (the
/// fixture's two photos and three captions, given here as a pair set).
#[test]
fn eval_retrieval_reranked_recall_follows_transformers_itm() {
    let d = tempfile::tempdir().unwrap();
    let (model, pairs, exp) = small_pairs(d.path());
    let out = common::ok(&common::clasp(&[
        "eval",
        "retrieval",
        "-m",
        &common::tiny(),
        "-d",
        &format!("pairs:{}", pairs.display()),
        "--json",
        "--no-cache",
        "--rerank",
        "itm:3",
        "--rerank-model",
        model.to_str().unwrap(),
    ]));
    let itm: Vec<Vec<Vec<f32>>> = exp["itm"].to_vec3().unwrap(); // [photo][caption][2]
    let (t2i, i2t) = recall_at_1(|i, j| {
        let l = &itm[i][j];
        1.0 / (1.0 + ((l[0] - l[1]) as f64).exp())
    });
    let r = &out["reranked"];
    assert_eq!(r["pairs_scored"], 3 * 2 + 2 * 3, "{r}");
    let got = |k: &str| r[k].as_f64().unwrap();
    assert!(
        (got("image_retrieval_recall@1") - t2i).abs() < 1e-9,
        "{r} vs {t2i}"
    );
    assert!(
        (got("text_retrieval_recall@1") - i2t).abs() < 1e-9,
        "{r} vs {i2t}"
    );
    assert!(
        out["image_retrieval_recall@1"].is_number(),
        "the first stage stays"
    );
    // A dual encoder cannot re-rank by itself.
    let o = common::clasp(&[
        "eval",
        "retrieval",
        "-m",
        &common::tiny(),
        "-d",
        &format!("pairs:{}", pairs.display()),
        "--rerank",
        "itm",
    ]);
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("fusion head"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `clasp eval retrieval -m BLIP2_FOLDER`: BLIP-2's own first stage, ITC
/// (the best query's cosine), ranks as transformers' ITC scores of the same
/// pairs; with `--rerank itm:3` the folder re-ranks its own candidates as
/// its ITM head scores them.
#[test]
fn eval_retrieval_of_a_blip2_folder_ranks_by_transformers_itc() {
    let d = tempfile::tempdir().unwrap();
    let (model, pairs, exp) = small_pairs(d.path());
    let out = common::ok(&common::clasp(&[
        "eval",
        "retrieval",
        "-m",
        model.to_str().unwrap(),
        "-d",
        &format!("pairs:{}", pairs.display()),
        "--json",
        "--rerank",
        "itm:3",
    ]));
    let itc: Vec<Vec<f32>> = exp["itc"].to_vec2().unwrap(); // [photo][caption]
    let (t2i, i2t) = recall_at_1(|i, j| itc[i][j] as f64);
    let got = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap();
    assert_eq!(out["first_stage"], "itc", "{out}");
    assert!(
        (got(&out, "image_retrieval_recall@1") - t2i).abs() < 1e-9,
        "{out}"
    );
    assert!(
        (got(&out, "text_retrieval_recall@1") - i2t).abs() < 1e-9,
        "{out}"
    );
    let itm: Vec<Vec<Vec<f32>>> = exp["itm"].to_vec3().unwrap();
    let (t2i, i2t) = recall_at_1(|i, j| (itm[i][j][1] - itm[i][j][0]) as f64);
    let r = &out["reranked"];
    assert!(
        (got(r, "image_retrieval_recall@1") - t2i).abs() < 1e-9,
        "{r}"
    );
    assert!(
        (got(r, "text_retrieval_recall@1") - i2t).abs() < 1e-9,
        "{r}"
    );
    // The same passes ordered by ALBEF's sum: the match logit plus the ITC score.
    let (t2i, i2t) = recall_at_1(|i, j| itm[i][j][1] as f64 + itc[i][j] as f64);
    let o = &r["other_score"];
    assert_eq!(o["score"], "itm+sim", "{o}");
    assert!(
        (got(o, "image_retrieval_recall@1") - t2i).abs() < 1e-9,
        "{o}"
    );
    assert!(
        (got(o, "text_retrieval_recall@1") - i2t).abs() < 1e-9,
        "{o}"
    );
}
