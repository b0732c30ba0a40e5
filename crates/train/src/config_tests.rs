//! Unit tests of `config` (kept beside it, in their own file).
use super::*;

fn table(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    v.as_object().unwrap().clone()
}

#[test]
fn a_table_takes_defaults_for_missing_keys_and_types_the_given_ones() {
    let c = TrainConfig::from_table(table(serde_json::json!({
        "init": "ckpt", "dataset": "pairs:x.tsv", "output": "out",
        "lang": "zh", "split": "dev", "daa_temp": 0.1, "device": "cpu"
    })))
    .unwrap();
    let d = TrainConfig::default();
    assert_eq!(c.lang, Lang::Zh);
    assert_eq!(c.split, Split::Dev);
    assert_eq!(c.objective_params.daa.daa_temp, 0.1);
    assert_eq!(c.objective_params.triplet, d.objective_params.triplet);
    assert_eq!((c.steps, c.batch_size, c.warmup_steps()), (1000, 32, 100));
    let ds = c.dataset.as_ref().unwrap();
    assert_eq!(String::from(ds.clone()), "pairs:x.tsv");
    // What a run saves reads back as the same config.
    let again: TrainConfig = serde_json::from_value(serde_json::to_value(&c).unwrap()).unwrap();
    assert_eq!(again, c);
}

#[test]
fn unknown_keys_and_bad_values_are_refused_by_name() {
    let base = serde_json::json!({"init": "c", "dataset": "pairs:x.tsv", "output": "o"});
    let with = |k: &str, v: serde_json::Value| {
        let mut t = table(base.clone());
        t.insert(k.into(), v);
        TrainConfig::from_table(t).err().unwrap().to_string()
    };
    assert!(with("batchsize", 3.into()).contains("`batchsize`"));
    assert!(with("lang", "fr".into()).contains("unknown language `fr`"));
    assert!(with("crop_scale", 1.5.into()).contains("crop_scale"));
    assert!(with("objective", "infonce,adversary".into()).contains("`adversary`"));
    assert!(with("preset", "tiny".into()).contains("one of init, preset and image_init"));
    let mut t = table(base);
    t.remove("output");
    assert!(TrainConfig::from_table(t)
        .err()
        .unwrap()
        .to_string()
        .contains("output"));
}

/// A pretrained CNN image tower starts a run only with a text tower to
/// meet it and locked (it runs without gradients), and alone.
#[test]
fn image_init_needs_text_init_and_a_locked_image_tower() {
    let cfg = |extra: serde_json::Value| {
        let mut t = table(serde_json::json!({
            "image_init": "mobilenet_v2.pth", "dataset": "pairs:x.tsv", "output": "o"
        }));
        t.extend(table(extra));
        TrainConfig::from_table(t)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    assert!(cfg(serde_json::json!({"lock_image": true}))
        .unwrap_err()
        .contains("needs text_init"));
    assert!(cfg(serde_json::json!({"text_init": "bert"}))
        .unwrap_err()
        .contains("lock_image"));
    assert!(
        cfg(serde_json::json!({"text_init": "bert", "lock_image": true, "preset": "tiny"}))
            .unwrap_err()
            .contains("one of init, preset and image_init")
    );
    cfg(serde_json::json!({"text_init": "bert", "lock_image": true})).unwrap();
}

/// Each key of the other task is refused by name, the task named, and
/// every key that `TrainConfig` has belongs to a task or to both.
#[test]
fn a_key_the_task_does_not_use_is_refused_by_name() {
    let vlm = serde_json::json!({"llm": "l.gguf", "vision": "v", "dataset": "pairs:x.tsv", "output": "o"});
    let clip = serde_json::json!({"init": "c", "dataset": "pairs:x.tsv", "output": "o"});
    for (base, keys, task) in [
        (&vlm, DUAL_ENCODER_KEYS, "vision-language"),
        (&clip, VISION_LANGUAGE_KEYS, "dual-encoder"),
    ] {
        assert!(TrainConfig::from_table(table(base.clone())).is_ok());
        let defaults = serde_json::to_value(TrainConfig::default()).unwrap();
        for k in keys {
            let mut t = table(base.clone());
            // A value of the key's own type (its default, or a string).
            let v = match &defaults[*k] {
                serde_json::Value::Null if k.ends_with("dataset") => "pairs:x.tsv".into(),
                serde_json::Value::Null if k.ends_with("_lr") => 1e-4.into(),
                serde_json::Value::Null => "x".into(),
                v => v.clone(),
            };
            t.insert(k.to_string(), v);
            let e = TrainConfig::from_table(t).expect_err(k).to_string();
            assert!(
                e.contains(&format!("`{k}`")) && e.contains(task),
                "{k}: {e}"
            );
        }
    }
    for k in TrainConfig::keys() {
        assert!(
            !(DUAL_ENCODER_KEYS.contains(&k.as_str())
                && VISION_LANGUAGE_KEYS.contains(&k.as_str())),
            "{k} is in both lists"
        );
    }
}

#[test]
fn a_value_of_the_wrong_type_names_its_key() {
    let t = table(serde_json::json!({
        "init": "c", "dataset": "pairs:x.tsv", "output": "o", "lr": "fast"
    }));
    let e = TrainConfig::from_table(t).err().unwrap().to_string();
    assert!(e.contains("`lr`") && e.contains("invalid type"), "{e}");
    // A nested objective parameter too.
    let t = table(serde_json::json!({
        "init": "c", "dataset": "pairs:x.tsv", "output": "o", "daa_temp": [1]
    }));
    let e = TrainConfig::from_table(t).err().unwrap().to_string();
    assert!(
        e.contains("`daa_temp`") && e.contains("invalid type"),
        "{e}"
    );
}

#[test]
fn the_default_table_lists_every_objective_parameter() {
    let d = TrainConfig::default_values();
    for k in [
        "daa_temp",
        "triplet_margin",
        "geometric_k",
        "adv_hidden",
        "distill_temp",
        "steps",
    ] {
        assert!(d.contains_key(k), "{k}");
    }
    assert!(!d.contains_key("init") && !d.contains_key("warmup"));
}

/// The connector is an enum: a name it does not know is refused naming the
/// key and the names it takes; the old spellings still read.
#[test]
fn an_unknown_connector_names_its_key_and_the_choices() {
    let vlm = |c: &str| {
        table(serde_json::json!({
            "llm": "l.gguf", "vision": "v", "dataset": "pairs:x.tsv", "output": "o",
            "connector": c
        }))
    };
    let e = TrainConfig::from_table(vlm("mlp3"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("`connector`") && e.contains("mlp2x_gelu") && e.contains("resampler"),
        "{e}"
    );
    for (name, want) in [
        ("mlp2x_gelu", Connector::Mlp2xGelu),
        ("mlp", Connector::Mlp2xGelu),
        ("perceiver", Connector::Resampler),
    ] {
        assert_eq!(TrainConfig::from_table(vlm(name)).unwrap().connector, want);
    }
}
