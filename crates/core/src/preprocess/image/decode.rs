//! Reading images: decoding with EXIF orientation, the size limit, truncation checks, and conversion to 8-bit RGB as transformers converts.

use super::*;

/// Reads and decodes an image file, applies its EXIF orientation and converts
/// it to 8-bit RGB. Errors name the file.
pub fn load_image(path: &Path) -> Result<RgbImage> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return Err(Error::IsDirectory {
            path: path.to_path_buf(),
        });
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_image(&bytes, path)
}

/// Decodes image bytes; `path` only names the input in errors.
/// The most pixels an image may have: Pillow's `DecompressionBombError`
/// threshold (2 × `Image.MAX_IMAGE_PIXELS`).
pub const MAX_IMAGE_PIXELS: u64 = 2 * 89_478_485;

pub fn decode_image(bytes: &[u8], path: &Path) -> Result<RgbImage> {
    let fail = |reason: String| Error::ImageDecode {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.is_empty() {
        return Err(Error::EmptyFile {
            path: path.to_path_buf(),
        });
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| fail(e.to_string()))?;
    if reader.format().is_none() {
        return Err(fail("unrecognised image format".into()));
    }
    if reader.format() == Some(image::ImageFormat::Jpeg) && jpeg_is_truncated(bytes) {
        return Err(fail(
            "truncated JPEG (no end-of-image marker after the last scan)".into(),
        ));
    }
    let format = reader.format();
    let mut decoder = reader.into_decoder().map_err(|e| fail(e.to_string()))?;
    // A few KB can claim billions of pixels (found by fuzzing: a 2.4 KB JPEG
    // whose header says 65490x65475 held `clasp embed` for minutes): refuse
    // before decoding, at Pillow's DecompressionBombError threshold.
    let (w, h) = decoder.dimensions();
    if w as u64 * h as u64 > MAX_IMAGE_PIXELS {
        return Err(fail(format!(
            "{w}x{h} is over {MAX_IMAGE_PIXELS} pixels (a decompression bomb?)"
        )));
    }
    let orientation = decoder.orientation().map_err(|e| fail(e.to_string()))?;
    // JPEG through libjpeg, as Pillow decodes it (see `libjpeg`).
    #[cfg(feature = "libjpeg")]
    if format == Some(image::ImageFormat::Jpeg) {
        drop(decoder);
        let mut img =
            DynamicImage::ImageRgb8(super::libjpeg::decode(bytes, MAX_IMAGE_PIXELS).map_err(fail)?);
        img.apply_orientation(orientation);
        return Ok(to_rgb(img));
    }
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| fail(e.to_string()))?;
    img.apply_orientation(orientation);
    Ok(to_rgb(img))
}

/// The JPEG decoder fills missing scan data with grey instead of failing (Pillow
/// raises), so truncation is checked structurally: a complete file has an EOI
/// marker (FF D9) after its last start-of-scan (FF DA). Entropy-coded data
/// stuffs every FF byte with 00, so neither marker can occur inside a scan, and
/// an EXIF thumbnail's EOI lies before the main image's scans.
pub(super) fn jpeg_is_truncated(bytes: &[u8]) -> bool {
    let last = |m: u8| bytes.windows(2).rposition(|w| w[0] == 0xFF && w[1] == m);
    match (last(0xDA), last(0xD9)) {
        (Some(sos), Some(eoi)) => eoi < sos,
        (Some(_), None) => true,
        (None, _) => false, // no scan at all: the decoder reports that itself
    }
}

/// Converts to RGB8. Images with an alpha channel are composited onto white,
/// as transformers' `convert_to_rgb` does; the rest are converted directly.
pub fn to_rgb(img: DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return img.into_rgb8();
    }
    let rgba = img.into_rgba8();
    let (w, h) = rgba.dimensions();
    let mut out = RgbImage::new(w, h);
    for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
        let a = p[3] as u32;
        for c in 0..3 {
            // round((src * a + 255 * (255 - a)) / 255), PIL's alpha_composite on
            // an opaque white background.
            let v = p[c] as u32 * a + 255 * (255 - a);
            o[c] = ((v + 127) / 255) as u8;
        }
    }
    out
}
