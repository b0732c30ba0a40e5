//! Unit tests of `image` (kept beside it, in their own file).
use super::*;

#[test]
fn random_resized_crop_is_seeded_and_sized() {
    let p = ImageProcessor::new(ImageProcessorConfig::clip_default(32));
    let img = RgbImage::from_fn(90, 60, |x, y| image::Rgb([(x * 2) as u8, (y * 3) as u8, 7]));
    let draws = |seed: u64| {
        let mut s = seed;
        move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 11) as f64 / (1u64 << 53) as f64
        }
    };
    let a = p.normalize(&p.random_resized_crop(&img, (0.5, 1.0), &mut draws(1)));
    let b = p.normalize(&p.random_resized_crop(&img, (0.5, 1.0), &mut draws(1)));
    let c = p.normalize(&p.random_resized_crop(&img, (0.5, 1.0), &mut draws(2)));
    assert_eq!(a.len(), 3 * 32 * 32);
    assert_eq!(a, b, "same draws, same crop");
    assert_ne!(a, c, "other draws, other crop");
    // A square image at full scale and aspect 1 is the plain resize.
    let sq = RgbImage::from_fn(64, 64, |x, y| image::Rgb([x as u8, y as u8, 9]));
    let mut one = [0.0, 0.5, 0.0, 0.0].into_iter().cycle();
    let full = p.normalize(&p.random_resized_crop(&sq, (1.0, 1.0), &mut || one.next().unwrap()));
    assert_eq!(full, p.process(&sq).unwrap());
}

#[test]
fn shortest_edge_truncates_long_side_like_transformers() {
    // 500x333 (w x h): new long = int(224 * 500 / 333) = 336
    assert_eq!(
        resize_target((333, 500), ResizeTo::ShortestEdge(224)),
        (224, 336)
    );
    assert_eq!(
        resize_target((500, 333), ResizeTo::ShortestEdge(224)),
        (336, 224)
    );
    assert_eq!(
        resize_target((10, 10), ResizeTo::ShortestEdge(224)),
        (224, 224)
    );
}

#[test]
fn center_crop_uses_floor_offsets() {
    let img = RgbImage::from_fn(5, 4, |x, y| image::Rgb([x as u8, y as u8, 0]));
    let c = center_crop(&img, (2, 2), CropRounding::Floor);
    // top = (4-2)//2 = 1, left = (5-2)//2 = 1
    assert_eq!(c.get_pixel(0, 0).0, [1, 1, 0]);
    assert_eq!(c.get_pixel(1, 1).0, [2, 2, 0]);
}

#[test]
fn alpha_is_composited_onto_white() {
    let mut img = image::RgbaImage::new(1, 3);
    img.put_pixel(0, 0, image::Rgba([0, 0, 0, 0]));
    img.put_pixel(0, 1, image::Rgba([10, 20, 30, 255]));
    img.put_pixel(0, 2, image::Rgba([0, 0, 0, 128]));
    let rgb = to_rgb(DynamicImage::ImageRgba8(img));
    assert_eq!(rgb.get_pixel(0, 0).0, [255, 255, 255]);
    assert_eq!(rgb.get_pixel(0, 1).0, [10, 20, 30]);
    // 255 * 127 / 255 = 127
    assert_eq!(rgb.get_pixel(0, 2).0, [127, 127, 127]);
}

#[test]
fn jpeg_truncation_is_detected_by_markers() {
    let complete = [0xFF, 0xD8, 0xFF, 0xDA, 1, 2, 0xFF, 0x00, 3, 0xFF, 0xD9];
    assert!(!jpeg_is_truncated(&complete));
    assert!(jpeg_is_truncated(&complete[..8]));
    // a thumbnail's EOI before the main scan does not count
    let thumb = [0xFF, 0xD8, 0xFF, 0xD9, 0xFF, 0xDA, 1, 2];
    assert!(jpeg_is_truncated(&thumb));
}

#[test]
fn old_feature_extractor_names_are_accepted() {
    let json = r#"{"feature_extractor_type":"ChineseCLIPFeatureExtractor",
                   "size":{"height":224,"width":224},"do_center_crop":false}"#;
    let cfg = ImageProcessorConfig::from_json(json, Path::new("p.json")).unwrap();
    assert_eq!(
        cfg.resize,
        ResizeTo::Exact {
            height: 224,
            width: 224
        }
    );
    assert!(!cfg.do_center_crop);
}

#[test]
fn empty_and_garbage_bytes_name_the_input() {
    let e = decode_image(&[], Path::new("a.jpg"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("a.jpg") && e.contains("empty"), "{e}");
    let e = decode_image(b"not an image", Path::new("b.png"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("b.png"), "{e}");
}

/// Found by fuzzing: a small JPEG whose frame header claims ~2.7 gigapixels
/// is refused from its header, at once, instead of being decoded.
#[test]
fn a_jpeg_claiming_billions_of_pixels_is_refused_before_decoding() {
    let root = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    let mut bytes = std::fs::read(root.join("tests/fixtures/core/images/rgb.jpg")).unwrap();
    // The baseline frame header: FF C0, length (2), precision (1), height (2), width (2).
    let sof = bytes
        .windows(2)
        .position(|w| w == [0xFF, 0xC0])
        .expect("a baseline JPEG");
    bytes[sof + 5..sof + 9].copy_from_slice(&[0xC3, 0xC3, 0xD2, 0xD2]);
    let t = std::time::Instant::now();
    let e = decode_image(&bytes, std::path::Path::new("bomb.jpg")).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("bomb.jpg") && msg.contains("53970x50115"),
        "{msg}"
    );
    assert!(msg.contains("decompression bomb"), "{msg}");
    assert!(t.elapsed().as_secs() < 5, "refused from the header");
    // At the limit's scale, a real image still decodes.
    let ok = std::fs::read(root.join("tests/fixtures/core/images/rgb.jpg")).unwrap();
    assert!(decode_image(&ok, std::path::Path::new("rgb.jpg")).is_ok());
}

/// Found by fuzzing: a PNG whose header claims 60x536870957 pixels made the
/// decoder ask for a 96 GB buffer and abort the process. With a valid CRC
/// (the fuzz build skips CRC checks) it is now refused from its header.
#[test]
fn a_png_claiming_billions_of_pixels_is_refused_not_allocated() {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in bytes {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 == 1 {
                    (c >> 1) ^ 0xEDB8_8320
                } else {
                    c >> 1
                };
            }
        }
        !c
    }
    let root = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    let mut bytes = std::fs::read(root.join("tests/fixtures/core/images/palette.png")).unwrap();
    // IHDR: length (4) "IHDR" width (4) height (4) ... CRC over type + data.
    assert_eq!(&bytes[12..16], b"IHDR");
    bytes[16..20].copy_from_slice(&60u32.to_be_bytes());
    bytes[20..24].copy_from_slice(&0x2000_002Du32.to_be_bytes());
    let crc = crc32(&bytes[12..29]);
    bytes[29..33].copy_from_slice(&crc.to_be_bytes());
    let e = decode_image(&bytes, std::path::Path::new("tall.png")).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("60x536870957") && msg.contains("decompression bomb"),
        "{msg}"
    );
}

#[test]
fn torchvision_crop_offsets_round_half_to_even_as_python() {
    // int(round(d / 2)) in Python for d = 0..=7: 0, 0, 1, 2, 2, 2, 3, 4.
    let want = [0, 0, 1, 2, 2, 2, 3, 4];
    for (d, w) in want.iter().enumerate() {
        assert_eq!(
            CropRounding::Torchvision.offset(224 + d as u32, 224),
            *w,
            "d={d}"
        );
    }
    // The two cases that differ from transformers' floor on real photos:
    // 500x334 resized to 335x224, and a 2162x762 diagram to 635x224.
    assert_eq!(CropRounding::Torchvision.offset(335, 224), 56);
    assert_eq!(CropRounding::Floor.offset(335, 224), 55);
    assert_eq!(CropRounding::Torchvision.offset(635, 224), 206);
    // A crop larger than the image: torchvision pads (crop - size) // 2
    // before it.
    assert_eq!(CropRounding::Torchvision.offset(221, 224), -1);
    assert_eq!(CropRounding::Floor.offset(221, 224), -2);
}

#[test]
fn processor_json_round_trips_crop_rounding_and_patch_budgets() {
    let p = Path::new("preprocessor_config.json");
    let mut c = ImageProcessorConfig::clip_default(224);
    c.crop_rounding = CropRounding::Torchvision;
    let back = ImageProcessorConfig::from_json(&c.to_hf_json().to_string(), p).unwrap();
    assert_eq!(back.crop_rounding, CropRounding::Torchvision);
    assert_ne!(
        back.key_bytes(),
        ImageProcessorConfig::clip_default(224).key_bytes()
    );
    let n = ImageProcessorConfig::siglip2_default(16, 256);
    let back = ImageProcessorConfig::from_json(&n.to_hf_json().to_string(), p).unwrap();
    assert_eq!(back.key_bytes(), n.key_bytes());
}

#[test]
fn pixel_budget_size_is_emu3s_smart_resize() {
    // transformers' smart_resize (Emu3ImageProcessor) on these inputs.
    let cases = [
        ((375, 500, 8, 512 * 512, 1024 * 1024), (448, 592)),
        ((224, 224, 8, 96 * 96, 128 * 128), (128, 128)),
        ((422, 640, 8, 96 * 96, 128 * 128), (96, 152)),
        ((2000, 300, 8, 512 * 512, 1024 * 1024), (2000, 304)),
        ((100, 100, 8, 512 * 512, 1024 * 1024), (512, 512)),
        ((20, 4000, 8, 64, 1024), (8, 448)),
    ];
    for ((h, w, f, lo, hi), want) in cases {
        assert_eq!(pixel_budget_size(h, w, f, lo, hi), want, "{h}x{w}");
    }
    let p = Path::new("preprocessor_config.json");
    let json = r#"{"image_processor_type": "Emu3ImageProcessor", "min_pixels": 9216,
        "max_pixels": 16384, "spatial_factor": 8, "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5]}"#;
    let c = ImageProcessorConfig::from_json(json, p).unwrap();
    assert!(!c.do_center_crop);
    assert_eq!(c.output_size((422, 640)), (96, 152));
    let back = ImageProcessorConfig::from_json(&c.to_hf_json().to_string(), p).unwrap();
    assert_eq!(back.key_bytes(), c.key_bytes());
}
