use super::PANEL;
use std::arch::x86_64::*;

/// # Safety
/// AVX-512F; `a`: `R` rows `lda` apart of `kc` floats; `b`: `P` panels
/// `stride` apart of `kc * 16` floats; `c`: `R` rows `ldc` apart of
/// `P * 16` floats.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn tile<const R: usize, const P: usize>(
    a: *const f32,
    lda: usize,
    b: *const f32,
    stride: usize,
    kc: usize,
    c: *mut f32,
    ldc: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); P]; R];
    for (r, accr) in acc.iter_mut().enumerate() {
        for (p, v) in accr.iter_mut().enumerate() {
            *v = _mm512_loadu_ps(c.add(r * ldc + p * PANEL));
        }
    }
    for kk in 0..kc {
        let mut bv = [_mm512_setzero_ps(); P];
        for (p, v) in bv.iter_mut().enumerate() {
            *v = _mm512_loadu_ps(b.add(p * stride + kk * PANEL));
        }
        for (r, accr) in acc.iter_mut().enumerate() {
            let av = _mm512_set1_ps(*a.add(r * lda + kk));
            for (v, &bw) in accr.iter_mut().zip(&bv) {
                *v = _mm512_fmadd_ps(av, bw, *v);
            }
        }
    }
    for (r, accr) in acc.iter().enumerate() {
        for (p, v) in accr.iter().enumerate() {
            _mm512_storeu_ps(c.add(r * ldc + p * PANEL), *v);
        }
    }
}
