use super::{Tile, GROUP, PANEL};
use std::arch::x86_64::*;

/// `R` rows × `P` panels.
///
/// # Safety
/// The CPU has AVX-512F/BW/VNNI; `a` points to `R` rows of
/// `lda >= groups * 4` bytes; `b` to `P` panels `stride` bytes apart, each
/// of `groups * 64` bytes.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn tile<const R: usize, const P: usize>(
    a: *const u8,
    lda: usize,
    b: *const i8,
    stride: usize,
    groups: usize,
    out: &mut Tile,
) {
    let mut acc = [[_mm512_setzero_si512(); P]; R];
    for g in 0..groups {
        let mut bv = [_mm512_setzero_si512(); P];
        for (p, v) in bv.iter_mut().enumerate() {
            // SAFETY: inside panel p, as the caller guarantees.
            *v = _mm512_loadu_si512(b.add(p * stride + g * GROUP * PANEL) as *const _);
        }
        for (r, accr) in acc.iter_mut().enumerate() {
            let av = _mm512_set1_epi32((a.add(r * lda + g * GROUP) as *const i32).read_unaligned());
            for (acc, &bw) in accr.iter_mut().zip(&bv) {
                *acc = _mm512_dpbusd_epi32(*acc, av, bw);
            }
        }
    }
    for (r, accr) in acc.iter().enumerate() {
        for (p, v) in accr.iter().enumerate() {
            _mm512_storeu_si512(out[r][p * PANEL..].as_mut_ptr() as *mut _, *v);
        }
    }
}
