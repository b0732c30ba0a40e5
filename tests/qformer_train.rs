//! BLIP-2's stage 1 as a `clasp train` task (`--task qformer`): a Q-Former
//! started from a BERT over torchvision's locked MobileNetV2, trained on
//! photo–caption pairs, saved as a folder the re-ranker loads.

mod common;
mod train_e2e_util;

use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use clasp::model::qformer::QFormerHeads;
use common::max_abs;
use train_e2e_util::{fails_with, losses, resume_ok, run_ok, small_flickr, tiny_bert, weights};

/// A Q-Former started from MiniLM reads a caption as MiniLM does: with no
/// queries and no image, its layers are MiniLM's (self-attention, the text
/// feed-forward, the embeddings with token type 0 folded into the positions),
/// so its last hidden states, mean-pooled and normalised, equal
/// sentence-transformers' MiniLM embedding (clasp's `SentenceEncoder`, held
/// to sentence-transformers elsewhere). The queries' feed-forward starts as a
/// copy of the text's (LAVIS's `*_query` copy), and `[DEC]` is the word
/// after BERT's vocabulary.
#[test]
fn a_qformer_from_minilm_reads_captions_as_minilm() {
    let minilm = common::pretrained("minilm");
    let fresh = clasp::train::qformer_init::from_bert(&minilm, 1280, 32, 0).unwrap();
    let cfg = &fresh.config;
    assert_eq!(cfg.vocab_size, 30523);
    assert_eq!(
        (
            cfg.hidden_size,
            cfg.num_hidden_layers,
            cfg.cross_attention_frequency
        ),
        (384, 6, 2)
    );
    let t = &fresh.tensors;
    for l in 0..6 {
        let p = format!("qformer.encoder.layer.{l}");
        assert_eq!(
            max_abs(
                &t[&format!("{p}.intermediate_query.dense.weight")],
                &t[&format!("{p}.intermediate.dense.weight")]
            ),
            0.0
        );
        assert_eq!(
            t.contains_key(&format!("{p}.crossattention.attention.key.weight")),
            l % 2 == 0,
            "cross-attention every other layer"
        );
    }
    assert_eq!(t["query_tokens"].dims(), &[1, 32, 384]);
    let vb = VarBuilder::from_tensors(t.clone(), DType::F32, &Device::Cpu);
    let heads = QFormerHeads::load(vb, cfg, 32, 256).unwrap();

    let captions = [
        "A black dog is running through the grass .",
        "Two children play on a beach near the water .",
    ];
    let tok = clasp::preprocess::TextTokenizer::from_dir(&minilm, 32).unwrap();
    let (ids, mask) = tok
        .encode(&captions)
        .unwrap()
        .to_tensors(true, &Device::Cpu)
        .unwrap();
    let (ids, mask) = (
        ids.to_dtype(DType::U32).unwrap(),
        mask.to_dtype(DType::F32).unwrap(),
    );
    let states = heads.text_states(&ids, &mask).unwrap();
    let m = mask.unsqueeze(2).unwrap();
    let mean = (states.broadcast_mul(&m).unwrap().sum(1).unwrap())
        .broadcast_div(&m.sum(1).unwrap())
        .unwrap();
    let norm = mean.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap();
    let ours = mean.broadcast_div(&norm).unwrap();
    let st = clasp::model::sentence::SentenceEncoder::load(&minilm, &Device::Cpu).unwrap();
    let theirs = st.embed(&captions).unwrap();
    let d = max_abs(&ours, &theirs);
    assert!(d < 1e-5, "Q-Former text path vs MiniLM: {d}");
}

fn qformer_cmd(data: &Path, bert: &Path, out: &Path, steps: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_clasp"));
    c.env("CLASP_CACHE_DIR", data.join("cache"));
    c.args(["train", "--task", "qformer", "--vision"])
        .arg(common::pretrained("mobilenet_v2"))
        .arg("--text-init")
        .arg(bert)
        .args([
            "--queries",
            "4",
            "--steps",
            steps,
            "--batch-size",
            "8",
            "--lr",
            "1e-3",
            "--save-every",
            "2",
        ])
        .arg("--dataset")
        .arg(format!("flickr8k:{}", data.display()))
        .arg("--output")
        .arg(out);
    c
}

/// `clasp train --task qformer`: the three losses are logged and learn, the
/// tower stays torchvision's, the saved folder loads as a re-ranker whose
/// ITM head scores what the run's own heads score, and a run stopped and
/// resumed ends with the same bytes as one that was not. Bad starts are
/// refused by name.
#[test]
fn qformer_stage1_trains_saves_a_reranker_and_resumes_exactly() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("f8k");
    small_flickr(&data);
    let bert = tiny_bert(d.path());

    let out = d.path().join("qf");
    run_ok(qformer_cmd(&data, &bert, &out, "4"));
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 4);
    for r in &rows {
        for part in ["itc", "itm", "itg"] {
            assert!(r["losses"][part].as_f64().unwrap().is_finite(), "{r}");
        }
    }
    // ITG starts near ln(vocab) (the tiny BERT's 372 rows: ln 372 = 5.9)
    // and goes down.
    let itg: Vec<f64> = rows
        .iter()
        .map(|r| r["losses"]["itg"].as_f64().unwrap())
        .collect();
    assert!((itg[0] - 372f64.ln()).abs() < 0.6, "{itg:?}");
    assert!(itg[3] < itg[0], "{itg:?}");

    // The tower is torchvision's, bit for bit.
    let ckpt = out.join("checkpoint");
    let saved =
        candle_core::safetensors::load(ckpt.join("model.safetensors"), &Device::Cpu).unwrap();
    let (_, tv) =
        clasp::model::cnn_tower::read_pretrained(&common::pretrained("mobilenet_v2")).unwrap();
    let vision: Vec<&String> = saved
        .keys()
        .filter(|k| k.starts_with("vision_model."))
        .collect();
    let tower = tv.keys().filter(|k| !k.starts_with("classifier.")).count();
    assert_eq!(vision.len(), tower, "every tensor but the ImageNet head");
    for k in vision {
        assert_eq!(
            max_abs(&saved[k], &tv[&k["vision_model.".len()..]]),
            0.0,
            "{k}"
        );
    }

    // The folder is a re-ranker: BLIP-2's config over the CNN, 49 tokens
    // of 1280 per photo, and its ITM head equals the saved heads' own.
    let model = clasp::model::blip2::Blip2Retrieval::load(&ckpt, &Device::Cpu).unwrap();
    assert_eq!(model.cfg.num_query_tokens, 4);
    let photo = std::fs::read_dir(data.join("images"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let px = model.processor.process_path(&photo).unwrap();
    let px = Tensor::from_vec(px, (1, 3, 224, 224), &Device::Cpu).unwrap();
    let feats = model.image_features(&px).unwrap();
    assert_eq!(feats.dims(), &[1, 49, 1280]);
    let text = "a dog runs on the grass".to_string();
    let logits = model
        .itm_logits(&feats, std::slice::from_ref(&text))
        .unwrap();
    let vb = VarBuilder::from_tensors(saved.clone(), DType::F32, &Device::Cpu);
    let heads = QFormerHeads::load(vb, &model.cfg.qformer_config, 4, 256).unwrap();
    let tok = clasp::preprocess::TextTokenizer::from_dir(&ckpt, 32).unwrap();
    let (ids, mask) = tok
        .encode(&[&text])
        .unwrap()
        .to_tensors(true, &Device::Cpu)
        .unwrap();
    let direct = heads
        .itm(
            &feats,
            &ids.to_dtype(DType::U32).unwrap(),
            &mask.to_dtype(DType::F32).unwrap(),
        )
        .unwrap();
    assert!(max_abs(&logits, &direct) < 1e-6);
    let dec = tok.inner().unwrap().token_to_id("[DEC]");
    // The tiny tokenizer has 371 words and the embeddings 372 rows: [DEC]
    // takes the next id, which the embeddings already hold.
    assert_eq!(dec, Some(371), "[DEC] after the tokenizer's words");
    assert_eq!(model.cfg.qformer_config.vocab_size, 372);

    // Stopped after 2 steps and resumed: the same bytes as the run above.
    let again = d.path().join("again");
    let mut c = qformer_cmd(&data, &bert, &again, "4");
    c.args(["--stop-after", "2"]);
    run_ok(c);
    assert_eq!(losses(&again).len(), 2);
    resume_ok(&again);
    assert_eq!(losses(&again), losses(&out));
    assert_eq!(
        weights(&again),
        weights(&out),
        "a resumed run ends as an uninterrupted one"
    );

    stage2_from(&ckpt, &data, d.path());

    // A folder whose tower is wider than its Q-Former reads is refused by
    // name (a ResNet-50's 2048 channels under queries that read 1280).
    let wrong = d.path().join("wrong-tower");
    std::fs::create_dir(&wrong).unwrap();
    for f in std::fs::read_dir(&ckpt).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, wrong.join(f.file_name().unwrap())).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(wrong.join("config.json")).unwrap()).unwrap();
    cfg["vision_config"] = serde_json::json!({
        "model_type": "resnet", "hidden_sizes": [256, 512, 1024, 2048], "depths": [3, 4, 6, 3]
    });
    std::fs::write(wrong.join("config.json"), cfg.to_string()).unwrap();
    let err = clasp::model::blip2::Blip2Retrieval::load(&wrong, &Device::Cpu)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("does not fit its tower") && err.contains("2048"),
        "{err}"
    );

    // Refused by name.
    let mut c = qformer_cmd(&data, &bert, &d.path().join("x1"), "2");
    c.arg("--lock-image");
    fails_with(c, "`lock_image`");
    let mut c = Command::new(env!("CARGO_BIN_EXE_clasp"));
    c.args(["train", "--task", "qformer", "--vision"])
        .arg(common::pretrained("mobilenet_v2"))
        .arg("--dataset")
        .arg(format!("flickr8k:{}", data.display()))
        .arg("--output")
        .arg(d.path().join("x2"));
    fails_with(c, "text_init");
    let mut c = qformer_cmd(&data, &bert, &d.path().join("x3"), "2");
    c.args(["--objective", "itc,lm"]);
    fails_with(c, "`lm`");
}

/// BLIP-2's stage 2 from the stage-1 folder `ckpt`: the VLM's tower is the
/// folder's CNN and its connector the folder's Q-Former (its sizes, BLIP-2's
/// cross-attention every other layer, the queries' own feed-forward; the
/// text feed-forward left behind) with a fresh projection to SmolLM2; a
/// `clasp train --llm --vision FOLDER` step trains it and saves a VLM that
/// loads. Another connector with the folder is refused by name.
fn stage2_from(ckpt: &Path, data: &Path, tmp: &Path) {
    use clasp::vlm::{ConnectorKind, Vlm};
    let smol = common::smollm2();
    let vlm = Vlm::assemble(
        ckpt,
        &smol,
        ConnectorKind::qformer(16, 2, 2),
        -2,
        0,
        &Device::Cpu,
    )
    .unwrap();
    let ConnectorKind::QFormer {
        queries,
        layers,
        head_dim,
        cross_every,
        intermediate,
        ..
    } = vlm.connector.kind()
    else {
        panic!("a Q-Former connector")
    };
    assert_eq!(
        (queries, layers, head_dim, cross_every, intermediate),
        (4, 2, 8, 2, Some(37)),
        "the folder's sizes, not the flags'"
    );
    assert_eq!(vlm.image_tokens(), 4);
    let saved =
        candle_core::safetensors::load(ckpt.join("model.safetensors"), &Device::Cpu).unwrap();
    for (k, v) in vlm.connector.vars() {
        match saved.get(k) {
            Some(t) => assert_eq!(max_abs(v.as_tensor(), t), 0.0, "{k}"),
            None => assert!(k.starts_with("language_projection."), "{k} is new"),
        }
    }
    assert!(
        !vlm.connector
            .vars()
            .iter()
            .any(|(k, _)| k.contains(".intermediate.dense")),
        "the text feed-forward stays behind"
    );

    let out = tmp.join("stage2");
    let mut c = Command::new(env!("CARGO_BIN_EXE_clasp"));
    c.args(["train", "--llm"])
        .arg(&smol)
        .arg("--vision")
        .arg(ckpt)
        .args([
            "--connector",
            "qformer",
            "--steps",
            "1",
            "--batch-size",
            "2",
        ])
        .args(["--max-answer-tokens", "8", "--save-every", "0"])
        .arg("--dataset")
        .arg(format!("flickr8k:{}", data.display()))
        .arg("--output")
        .arg(&out);
    run_ok(c);
    let trained = Vlm::load(&out.join("checkpoint"), &Device::Cpu).unwrap();
    assert_eq!(trained.connector.kind(), vlm.connector.kind());
    assert_eq!(
        trained.vision_cnn().map(|c| c.name()).as_deref(),
        Some("MobileNetV2")
    );

    let mut c = Command::new(env!("CARGO_BIN_EXE_clasp"));
    c.args(["train", "--llm"])
        .arg(&smol)
        .arg("--vision")
        .arg(ckpt)
        .args(["--connector", "mlp2x_gelu", "--steps", "1"])
        .arg("--dataset")
        .arg(format!("flickr8k:{}", data.display()))
        .arg("--output")
        .arg(tmp.join("stage2-mlp"));
    fails_with(c, "--connector qformer");
}

/// Stage 1 over BLIP-2's own ViT, from a transformers
/// `Blip2ForImageTextRetrieval` folder (the scaled-down one, its tokenizer
/// taught `[DEC]`): the ITC and ITM heads learn, the tower stays as it was,
/// and the saved folder holds exactly the tensors (names and shapes) of
/// transformers' model, which the manifest lists, plus the run's `temp`,
/// with the config's sizes kept; it loads as a re-ranker.
#[test]
fn qformer_stage1_over_blip2s_vit_saves_transformers_retrieval_layout() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("f8k");
    small_flickr(&data);
    let init = d.path().join("blip2");
    std::fs::create_dir(&init).unwrap();
    common::blip2_small_folder(&init);
    // [DEC] as BLIP-2's tokenizer adds it: the id after BERT's vocabulary.
    let tj = init.join("tokenizer.json");
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tj).unwrap()).unwrap();
    tok["added_tokens"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "id": 30522, "content": "[DEC]", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }));
    std::fs::write(&tj, tok.to_string()).unwrap();

    let out = d.path().join("qf");
    let mut c = Command::new(env!("CARGO_BIN_EXE_clasp"));
    c.env("CLASP_CACHE_DIR", d.path().join("cache"));
    c.args(["train", "--task", "qformer", "--init"])
        .arg(&init)
        .args([
            "--objective",
            "itc,itm",
            "--steps",
            "3",
            "--batch-size",
            "8",
        ])
        .args(["--lr", "1e-3", "--dataset"])
        .arg(format!("flickr8k:{}", data.display()))
        .arg("--output")
        .arg(&out);
    run_ok(c);
    let ckpt = out.join("checkpoint");
    let load = |dir: &Path| {
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap()
    };
    let (saved, before) = (load(&ckpt), load(&init));
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/blip2/small/manifest.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let shapes = manifest["shapes"].as_object().unwrap();
    let mut names: Vec<&String> = saved.keys().filter(|k| *k != "temp").collect();
    names.sort();
    let mut want: Vec<&String> = shapes.keys().collect();
    want.sort();
    assert_eq!(names, want, "the saved tensors are not transformers' own");
    for (k, s) in shapes {
        let s: Vec<usize> = serde_json::from_value(s.clone()).unwrap();
        assert_eq!(saved[k].dims(), &s[..], "{k}");
        if k.starts_with("vision_model.") {
            assert_eq!(max_abs(&saved[k], &before[k]), 0.0, "{k}: the tower moved");
        }
    }
    let moved = max_abs(&saved["itm_head.weight"], &before["itm_head.weight"]);
    assert!(moved > 0.0, "the ITM head did not learn");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["vision_config"]["model_type"], "blip_2_vision_model");
    assert_eq!(cfg["image_text_hidden_size"], 32);
    assert_eq!(cfg["qformer_config"]["use_qformer_text_input"], true);
    let pp: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(ckpt.join("preprocessor_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(pp["image_processor_type"], "BlipImageProcessor");
    clasp::model::blip2::Blip2Retrieval::load(&ckpt, &Device::Cpu).unwrap();
}
