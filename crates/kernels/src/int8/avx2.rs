use super::{Tile, GROUP, PANEL};
use std::arch::x86_64::*;

/// `R` rows × one panel.
///
/// # Safety
/// The CPU has AVX2; `a` points to `R` rows of `lda >= groups * 4`
/// bytes; `b` to `groups * 64` bytes.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn tile<const R: usize>(
    a: *const u8,
    lda: usize,
    b: *const i8,
    groups: usize,
    out: &mut Tile,
) {
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_si256(); 2]; R];
    for g in 0..groups {
        // SAFETY (all reads): inside the ranges the caller guarantees.
        let bg = b.add(g * GROUP * PANEL);
        let b0 = _mm256_loadu_si256(bg as *const __m256i);
        let b1 = _mm256_loadu_si256(bg.add(32) as *const __m256i);
        for (r, accr) in acc.iter_mut().enumerate() {
            let av = _mm256_set1_epi32((a.add(r * lda + g * GROUP) as *const i32).read_unaligned());
            let aa = _mm256_sign_epi8(av, av);
            let p0 = _mm256_maddubs_epi16(aa, _mm256_sign_epi8(b0, av));
            let p1 = _mm256_maddubs_epi16(aa, _mm256_sign_epi8(b1, av));
            accr[0] = _mm256_add_epi32(accr[0], _mm256_madd_epi16(p0, ones));
            accr[1] = _mm256_add_epi32(accr[1], _mm256_madd_epi16(p1, ones));
        }
    }
    for (r, accr) in acc.iter().enumerate() {
        _mm256_storeu_si256(out[r].as_mut_ptr() as *mut __m256i, accr[0]);
        _mm256_storeu_si256(out[r][8..].as_mut_ptr() as *mut __m256i, accr[1]);
    }
}
