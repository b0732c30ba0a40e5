//! Unit tests of `encoder` (kept beside it, in their own file).
use super::*;

/// A text-only load embeds texts exactly as the whole model does, for
/// every architecture, and refuses images with an error that says why.
#[test]
fn text_only_encoders_embed_texts_as_the_whole_model_and_refuse_images() {
    let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("tests/fixtures/core");
    for name in ["tiny-clip", "tiny-chinese-clip", "tiny-dual-encoder"] {
        let spec = root.join(name).display().to_string();
        let whole = Encoder::load(&spec, &Device::Cpu).unwrap();
        let text = Encoder::load_towers(&spec, &Device::Cpu, model::Towers::Text).unwrap();
        let texts = ["a dog on a beach", "两只猫", "a red car"];
        let a = whole.embed_texts(&texts).unwrap().to_vec2::<f32>().unwrap();
        let b = text.embed_texts(&texts).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(a, b, "{name}");
        let img = image::RgbImage::from_pixel(32, 32, image::Rgb([200, 10, 10]));
        assert!(whole.embed_images(std::slice::from_ref(&img)).is_ok());
        let err = text.embed_images(&[img]).unwrap_err().to_string();
        assert!(err.contains("text only"), "{name}: {err}");
    }
}
