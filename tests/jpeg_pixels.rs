//! JPEG pixels as Pillow decodes them (libjpeg-turbo), byte for byte, on
//! fixtures Pillow made (scripts/gen_jpeg_fixtures.py): every kind of file
//! the decoder must get right, and photos of ../shared by hash. Images load
//! as transformers loads them: EXIF orientation applied, then RGB.

use std::path::{Path, PathBuf};

use clasp::preprocess::load_image;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jpeg")
}

fn fnv1a64(bytes: &[u8]) -> String {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01B3);
    }
    format!("{h:016x}")
}

/// Subsampling 4:2:0, 4:2:2 and 4:4:4, progressive, grayscale, CMYK, an odd
/// size and EXIF orientations 3, 6 and 8, each equal to Pillow's pixels.
#[test]
fn every_kind_of_jpeg_decodes_to_pillows_pixels() {
    let dir = fixtures().join("kinds");
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .collect();
    names.sort();
    assert_eq!(names.len(), 10);
    let mut differing = Vec::new();
    for jpg in &names {
        let ours = load_image(jpg).unwrap();
        let pil = image::open(jpg.with_extension("png")).unwrap().into_rgb8();
        assert_eq!(ours.dimensions(), pil.dimensions(), "{}", jpg.display());
        let max = ours
            .as_raw()
            .iter()
            .zip(pil.as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        if max > 0 {
            differing.push(format!("{} (max diff {max})", jpg.display()));
        }
    }
    assert!(differing.is_empty(), "not Pillow's pixels: {differing:?}");
}

/// Photos of ../shared: Flickr8k (dev and full size), COCO-mini, CIFAR-10
/// and the reference JPEG, each hashed over Pillow's RGB bytes.
#[test]
fn shared_photos_decode_to_pillows_bytes() {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("shared.json")).unwrap())
            .unwrap();
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    let photos = meta["photos"].as_object().unwrap();
    assert!(photos.len() >= 50, "{} photos", photos.len());
    let mut differing = Vec::new();
    for (rel, want) in photos {
        let img = load_image(&data.join(rel)).unwrap();
        let dims = (
            want["width"].as_u64().unwrap() as u32,
            want["height"].as_u64().unwrap() as u32,
        );
        assert_eq!(img.dimensions(), dims, "{rel}");
        if fnv1a64(img.as_raw()) != want["fnv1a64"].as_str().unwrap() {
            differing.push(rel.clone());
        }
    }
    assert!(
        differing.is_empty(),
        "{} of {} photos differ from Pillow {} (libjpeg-turbo {}): {differing:?}",
        differing.len(),
        photos.len(),
        meta["pillow"],
        meta["libjpeg_turbo"]
    );
}
