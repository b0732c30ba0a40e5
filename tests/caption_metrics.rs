//! Captioning metrics against pycocoevalcap (fixtures from
//! scripts/gen_caption_fixtures.py: its PTBTokenizer, Bleu(4), Rouge and
//! Cider on 60 Flickr8k dev images, 40 with their own caption as the
//! candidate and 20 with the next image's).

use clasp::eval::caption::{ptb_tokenize, score};
use serde_json::Value;

fn fixture() -> Value {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/caption/metrics.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn ptb_tokenization_equals_pycocoevalcaps_on_every_fixture_caption() {
    let fx = fixture();
    let items = fx["tokens"].as_array().unwrap();
    let bad: Vec<String> = items
        .iter()
        .filter_map(|t| {
            let got = ptb_tokenize(t["text"].as_str().unwrap());
            let want = t["ptb"].as_str().unwrap();
            (got != want).then(|| format!("{:?}\n  clasp: {got:?}\n  ptb:   {want:?}", t["text"]))
        })
        .collect();
    assert!(
        bad.is_empty(),
        "{} of {} differ:\n{}",
        bad.len(),
        items.len(),
        bad.join("\n")
    );
}

#[test]
fn bleu_rouge_l_and_cider_d_equal_pycocoevalcap_to_1e6() {
    let fx = fixture();
    let images = fx["images"].as_array().unwrap();
    let cands: Vec<String> = images
        .iter()
        .map(|i| ptb_tokenize(i["candidate"].as_str().unwrap()))
        .collect();
    let refs: Vec<Vec<String>> = images
        .iter()
        .map(|i| {
            i["refs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| ptb_tokenize(r.as_str().unwrap()))
                .collect()
        })
        .collect();
    let s = score(&cands, &refs);
    let want = &fx["scores"];
    let close = |a: f64, b: &Value, what: &str| {
        let b = b.as_f64().unwrap();
        assert!(
            (a - b).abs() <= 1e-6,
            "{what}: clasp {a} vs pycocoevalcap {b}"
        );
    };
    for n in 0..4 {
        close(s.bleu[n], &want["bleu"][n], &format!("BLEU-{}", n + 1));
    }
    close(s.rouge_l, &want["rouge_l"], "ROUGE-L");
    close(s.cider_d, &want["cider_d"], "CIDEr-D");
    let per = &want["per_image"];
    for (i, img) in s.per_image.iter().enumerate() {
        for n in 0..4 {
            close(
                img.bleu[n],
                &per["bleu"][n][i],
                &format!("image {i} BLEU-{}", n + 1),
            );
        }
        close(
            img.rouge_l,
            &per["rouge_l"][i],
            &format!("image {i} ROUGE-L"),
        );
        close(
            img.cider_d,
            &per["cider_d"][i],
            &format!("image {i} CIDEr-D"),
        );
    }
    // The wrong-photo control scores lower: the metric sees grounding.
    let own: f64 = s.per_image[..40].iter().map(|x| x.cider_d).sum::<f64>() / 40.0;
    let wrong: f64 = s.per_image[40..].iter().map(|x| x.cider_d).sum::<f64>() / 20.0;
    assert!(
        own > 2.0 * wrong,
        "own-photo CIDEr-D {own} vs wrong-photo {wrong}"
    );
}
