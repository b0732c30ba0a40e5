//! Tests of `open_clip.rs`.
use super::*;

fn configs() -> std::path::PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .join("tests/fixtures/open_clip/configs")
}

/// open_clip's own bundled configs of the supported models translate to
/// the CLIPConfig numbers of those models (openai/clip-vit-* and
/// laion/CLIP-ViT-H-14 on the Hub).
#[test]
fn real_configs_translate_to_clip_configs() {
    let cases = [
        ("ViT-B-32", 768, 12, 12, 32, 512, 8, 512),
        ("ViT-B-16", 768, 12, 12, 16, 512, 8, 512),
        ("ViT-L-14", 1024, 24, 16, 14, 768, 12, 768),
        ("ViT-H-14", 1280, 32, 16, 14, 1024, 16, 1024),
    ];
    for (name, vw, vl, vh, p, tw, th, embed) in cases {
        for (suffix, act) in [("", "gelu"), ("-quickgelu", "quick_gelu")] {
            let path = configs().join(format!("{name}{suffix}.json"));
            let c = OpenClipConfig::from_file(&path).unwrap().hf_config();
            let v = &c["vision_config"];
            assert_eq!(
                (v["hidden_size"].as_u64(), v["num_hidden_layers"].as_u64()),
                (Some(vw), Some(vl)),
                "{name}"
            );
            assert_eq!(v["num_attention_heads"], vh, "{name}");
            assert_eq!(v["patch_size"], p, "{name}");
            assert_eq!(v["intermediate_size"], vw * 4, "{name}");
            assert_eq!(c["text_config"]["hidden_size"], tw, "{name}");
            assert_eq!(c["text_config"]["num_attention_heads"], th, "{name}");
            assert_eq!(c["projection_dim"], embed, "{name}");
            assert_eq!(v["hidden_act"], act, "{name}{suffix}");
            let parsed = crate::model::ModelConfig::from_json(&c.to_string(), &path).unwrap();
            assert_eq!(parsed.model_type(), "clip");
        }
    }
}

#[test]
fn towers_clasp_cannot_run_are_refused_with_what_is_supported() {
    for (cfg, needle) in [
        (
            r#"{"embed_dim":768,"vision_cfg":{"timm_model_name":"convnext_large","timm_proj":"mlp","image_size":256},"text_cfg":{}}"#,
            "timm_proj \"mlp\"",
        ),
        (
            r#"{"embed_dim":768,"vision_cfg":{"timm_model_name":"vit_medium_patch16_gap_256","image_size":256},"text_cfg":{}}"#,
            "vit_medium_patch16_gap_256",
        ),
        (
            r#"{"embed_dim":1024,"vision_cfg":{"layers":[3,4,6],"width":64,"image_size":224},"text_cfg":{}}"#,
            "3 stages",
        ),
        (
            r#"{"embed_dim":512,"vision_cfg":{"image_size":224,"layers":12,"width":768,"patch_size":16,"attentional_pool":true},"text_cfg":{}}"#,
            "attentional_pool",
        ),
    ] {
        let err = OpenClipConfig::from_json(cfg, Path::new("m/open_clip_config.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{err}");
        assert!(err.contains("ViT-B-32"), "lists what is supported: {err}");
        assert!(err.contains("m/open_clip_config.json"), "{err}");
    }
}

/// OpenAI's RN50 config (open_clip's RN50.json) reads as a ModifiedResNet
/// CLIP: the tower's config in `vision_config` (a clasp model_type) with the
/// embedding width as its `hidden_size`, and the text tower as CLIP's.
#[test]
fn the_rn50_config_reads_as_a_resnet_clip() {
    let cfg = r#"{"embed_dim":1024,"vision_cfg":{"image_size":224,"layers":[3,4,6,3],"width":64,"patch_size":null},
        "text_cfg":{"context_length":77,"vocab_size":49408,"width":512,"heads":8,"layers":12}}"#;
    let c = OpenClipConfig::from_json(cfg, Path::new("RN50.json")).unwrap();
    let Some(crate::model::cnn_tower::CnnConfig::ModifiedResNet(r)) = c.cnn.as_ref() else {
        panic!("not a ResNet tower: {:?}", c.cnn)
    };
    assert_eq!(
        (r.name().as_str(), r.heads(), r.output_dim),
        ("CLIP RN50", 32, 1024)
    );
    let hf = c.hf_config();
    assert_eq!(
        hf["vision_config"]["model_type"],
        "open_clip_modified_resnet"
    );
    assert_eq!(hf["vision_config"]["hidden_size"], 1024);
    assert_eq!(hf["text_config"]["hidden_size"], 512);
    let parsed =
        crate::model::ModelConfig::from_json(&hf.to_string(), Path::new("c.json")).unwrap();
    let crate::model::ModelConfig::Clip(clip) = parsed else {
        panic!("not a CLIP config")
    };
    assert!(clip.image_cnn.is_some());
    assert_eq!(clip.vision_config.hidden_size, 1024);
}
