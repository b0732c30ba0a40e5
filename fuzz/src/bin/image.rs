//! Image decoding (every format clasp reads), preprocessing of what decodes,
//! and the EXIF/caption reader of the indexer.
use std::path::Path;

fn main() {
    let proc = clasp::preprocess::image::ImageProcessor::new(
        clasp::preprocess::image::ImageProcessorConfig::clip_default(32),
    );
    afl::fuzz!(|data: &[u8]| {
        let path = Path::new("fuzz.jpg");
        if let Ok(img) = clasp::preprocess::image::decode_image(data, path) {
            // Bounded: the decoder already refuses huge images.
            if (img.width() as u64) * (img.height() as u64) <= 4_000_000 {
                let _ = proc.process(&img);
            }
        }
        let _ = clasp::index::walk::caption_for(path, data);
    });
}
