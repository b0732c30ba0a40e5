use super::PANEL;
use std::arch::x86_64::*;

/// # Safety
/// AVX2 + FMA; `a`: `R` rows `lda` apart of `kc` floats; `b`: one panel
/// of `kc * 16` floats; `c`: `R` rows `ldc` apart of 16 floats.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn tile<const R: usize>(
    a: *const f32,
    lda: usize,
    b: *const f32,
    kc: usize,
    c: *mut f32,
    ldc: usize,
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for (r, accr) in acc.iter_mut().enumerate() {
        accr[0] = _mm256_loadu_ps(c.add(r * ldc));
        accr[1] = _mm256_loadu_ps(c.add(r * ldc + 8));
    }
    for kk in 0..kc {
        let b0 = _mm256_loadu_ps(b.add(kk * PANEL));
        let b1 = _mm256_loadu_ps(b.add(kk * PANEL + 8));
        for (r, accr) in acc.iter_mut().enumerate() {
            let av = _mm256_broadcast_ss(&*a.add(r * lda + kk));
            accr[0] = _mm256_fmadd_ps(av, b0, accr[0]);
            accr[1] = _mm256_fmadd_ps(av, b1, accr[1]);
        }
    }
    for (r, accr) in acc.iter().enumerate() {
        _mm256_storeu_ps(c.add(r * ldc), accr[0]);
        _mm256_storeu_ps(c.add(r * ldc + 8), accr[1]);
    }
}
