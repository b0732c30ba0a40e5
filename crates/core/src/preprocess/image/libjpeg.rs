//! JPEG decoding through libjpeg (mozjpeg's build of libjpeg-turbo's
//! decoder, compiled from source by `mozjpeg-sys` with the C compiler alone),
//! so that clasp's pixels are the ones Pillow gives: every reference clasp
//! is held to (transformers, open_clip, torchvision) decodes JPEG through
//! Pillow, that is libjpeg-turbo with its default integer IDCT and fancy
//! upsampling. The pure-Rust decoder (zune-jpeg, through `image`) differs
//! from it by up to one level per pixel. Tested equal to Pillow byte for byte
//! on baseline, progressive, grayscale, CMYK and subsampled files
//! (`tests/jpeg_pixels.rs`).
//!
//! libjpeg reports fatal errors through a callback that must not return; it
//! is given one that unwinds (mozjpeg-sys's `unwinding` feature builds the C
//! code to let a Rust panic cross it), caught here and turned into an error.

use std::panic::{catch_unwind, AssertUnwindSafe};

use image::RgbImage;
use mozjpeg_sys::{
    boolean, jpeg_common_struct, jpeg_create_decompress, jpeg_decompress_struct,
    jpeg_destroy_decompress, jpeg_error_mgr, jpeg_finish_decompress, jpeg_mem_src,
    jpeg_read_header, jpeg_read_scanlines, jpeg_start_decompress, jpeg_std_error, J_COLOR_SPACE,
};

/// libjpeg's message buffer (JMSG_LENGTH_MAX).
const JPEG_MESSAGE_LEN: usize = 80;

/// The payload of the panic that carries a libjpeg error out of the C code.
struct JpegPanic(String);

/// The panic hook lets `JpegPanic`s pass silently (they are errors, caught
/// and reported as such) and hands every other panic to the previous hook.
fn quiet_jpeg_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !info.payload().is::<JpegPanic>() {
                prev(info)
            }
        }));
    });
}

/// libjpeg's `error_exit`: formats its message and unwinds to
/// [`decode`]'s `catch_unwind`.
unsafe extern "C-unwind" fn error_exit(cinfo: &mut jpeg_common_struct) {
    let mut buf = [0u8; JPEG_MESSAGE_LEN];
    // SAFETY: `err` was set by `decode` to its live `jpeg_error_mgr`, whose
    // `format_message` (from `jpeg_std_error`) writes at most
    // JPEG_MESSAGE_LEN bytes, NUL-terminated, into the buffer. The binding
    // types that buffer as a shared reference although C writes it, so the
    // function is called through a pointer type that says so (both are one
    // pointer in the C ABI).
    let msg = unsafe {
        let err = &*cinfo.err;
        if let Some(f) = err.format_message {
            type Writes = unsafe extern "C-unwind" fn(&mut jpeg_common_struct, *mut u8);
            let f: Writes = std::mem::transmute(f);
            f(cinfo, buf.as_mut_ptr());
        }
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    };
    std::panic::panic_any(JpegPanic(msg));
}

/// Warnings (corrupt data that libjpeg recovers from) are not printed;
/// truncation, the one Pillow refuses, is checked before decoding.
unsafe extern "C-unwind" fn emit_message(_cinfo: &mut jpeg_common_struct, _level: i32) {}

/// Pillow's CMYK to RGB (`cmyk2rgb` in Convert.c): each channel is
/// (255 − k) − round((255 − k)·c / 255), with its MULDIV255 rounding.
fn cmyk_to_rgb(c: u8, k: u8) -> u8 {
    let nk = 255 - k as i32;
    let tmp = c as i32 * nk + 128;
    let muldiv = ((tmp >> 8) + tmp) >> 8;
    (nk - muldiv).clamp(0, 255) as u8
}

/// Decodes a JPEG to 8-bit RGB as Pillow's `Image.open(...).convert("RGB")`
/// does (EXIF orientation is the caller's). `max_pixels` is checked from the
/// header, before any pixel is decoded.
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, String> {
    quiet_jpeg_panics();
    let len = bytes
        .len()
        .try_into()
        .map_err(|_| "file too large".to_string())?;
    // SAFETY: zeroed structs are the state libjpeg expects before
    // `jpeg_std_error`/`jpeg_create_decompress` fill them; `err` outlives
    // `cinfo`'s use (both live to the end of this function), `bytes`
    // outlives the decode that reads it through `jpeg_mem_src`, and the
    // struct is destroyed on every path, the unwinding one included.
    unsafe {
        let mut err: jpeg_error_mgr = std::mem::zeroed();
        let mut cinfo: jpeg_decompress_struct = std::mem::zeroed();
        cinfo.common.err = jpeg_std_error(&mut err);
        (*cinfo.common.err).error_exit = Some(error_exit);
        (*cinfo.common.err).emit_message = Some(emit_message);
        jpeg_create_decompress(&mut cinfo);
        let out = catch_unwind(AssertUnwindSafe(|| {
            read(&mut cinfo, bytes.as_ptr(), len, max_pixels)
        }));
        jpeg_destroy_decompress(&mut cinfo);
        match out {
            Ok(r) => r,
            Err(p) => Err(match p.downcast::<JpegPanic>() {
                Ok(j) => j.0,
                Err(other) => std::panic::resume_unwind(other),
            }),
        }
    }
}

/// The decode proper, on a created decompressor.
///
/// # Safety
/// `cinfo` must be created, with the unwinding error manager, and `data`
/// must point at `len` readable bytes for the whole call.
unsafe fn read(
    cinfo: &mut jpeg_decompress_struct,
    data: *const u8,
    len: std::os::raw::c_ulong,
    max_pixels: u64,
) -> Result<RgbImage, String> {
    // SAFETY: per this function's contract; the scanline pointers handed to
    // `jpeg_read_scanlines` point into `row`, which holds one full output
    // row (output_width × output_components bytes).
    unsafe {
        jpeg_mem_src(cinfo, data, len);
        jpeg_read_header(cinfo, true as boolean);
        let (w, h) = (cinfo.image_width as u64, cinfo.image_height as u64);
        if w * h > max_pixels {
            return Err(format!(
                "{w}x{h} is over {max_pixels} pixels (a decompression bomb?)"
            ));
        }
        let cmyk = matches!(
            cinfo.jpeg_color_space,
            J_COLOR_SPACE::JCS_CMYK | J_COLOR_SPACE::JCS_YCCK
        );
        let gray = cinfo.jpeg_color_space == J_COLOR_SPACE::JCS_GRAYSCALE;
        cinfo.out_color_space = if cmyk {
            J_COLOR_SPACE::JCS_CMYK
        } else if gray {
            J_COLOR_SPACE::JCS_GRAYSCALE
        } else {
            J_COLOR_SPACE::JCS_RGB
        };
        jpeg_start_decompress(cinfo);
        let (ow, oh) = (cinfo.output_width as usize, cinfo.output_height as usize);
        let comps = cinfo.output_components as usize;
        let expect = if cmyk {
            4
        } else if gray {
            1
        } else {
            3
        };
        if comps != expect {
            return Err(format!("{comps} output components, expected {expect}"));
        }
        let mut out = RgbImage::new(ow as u32, oh as u32);
        let mut row = vec![0u8; ow * comps];
        let dst: &mut [u8] = &mut out;
        while (cinfo.output_scanline as usize) < oh {
            let y = cinfo.output_scanline as usize;
            let mut rows = [row.as_mut_ptr()];
            if jpeg_read_scanlines(cinfo, rows.as_mut_ptr(), 1) != 1 {
                return Err(format!("no data for row {y}"));
            }
            let line = &mut dst[y * ow * 3..(y + 1) * ow * 3];
            match comps {
                3 => line.copy_from_slice(&row),
                1 => {
                    for (px, &v) in line.chunks_exact_mut(3).zip(&row) {
                        px.fill(v);
                    }
                }
                _ => {
                    // Pillow reads CMYK JPEGs as Adobe writes them,
                    // inverted ("CMYK;I"), then converts.
                    for (px, src) in line.chunks_exact_mut(3).zip(row.chunks_exact(4)) {
                        let k = 255 - src[3];
                        for c in 0..3 {
                            px[c] = cmyk_to_rgb(255 - src[c], k);
                        }
                    }
                }
            }
        }
        jpeg_finish_decompress(cinfo);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_an_error_not_an_exit() {
        let e = decode(b"\xff\xd8\xff\xe0 not really a jpeg", 1 << 30).unwrap_err();
        assert!(!e.is_empty());
    }

    #[test]
    fn cmyk_conversion_is_pillows() {
        // Pillow: Image.new("CMYK", (1, 1), (c, m, y, k)).convert("RGB").
        assert_eq!(cmyk_to_rgb(0, 0), 255);
        assert_eq!(cmyk_to_rgb(255, 0), 0);
        assert_eq!(cmyk_to_rgb(0, 255), 0);
        assert_eq!(cmyk_to_rgb(100, 50), 125);
        assert_eq!(cmyk_to_rgb(0, 50), 205);
    }
}
