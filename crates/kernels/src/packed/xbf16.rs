use super::PANEL;
use std::arch::x86_64::*;

/// # Safety
/// AVX-512F and AVX-512 BF16; `a`: `R` rows `lda` apart of `kc` bf16
/// pairs; `b`: `P` panels `stride` apart of `kc * 16` pairs; `c`: `R`
/// rows `ldc` apart of `P * 16` floats.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn tile<const R: usize, const P: usize>(
    a: *const u32,
    lda: usize,
    b: *const u32,
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
        let mut bv = [_mm512_setzero_si512(); P];
        for (p, v) in bv.iter_mut().enumerate() {
            *v = _mm512_loadu_si512(b.add(p * stride + kk * PANEL) as *const _);
        }
        for (r, accr) in acc.iter_mut().enumerate() {
            let av = _mm512_set1_epi32(*a.add(r * lda + kk) as i32);
            let av: __m512bh = std::mem::transmute(av);
            for (v, &bw) in accr.iter_mut().zip(&bv) {
                *v = _mm512_dpbf16_ps(*v, av, std::mem::transmute::<__m512i, __m512bh>(bw));
            }
        }
    }
    for (r, accr) in acc.iter().enumerate() {
        for (p, v) in accr.iter().enumerate() {
            _mm512_storeu_ps(c.add(r * ldc + p * PANEL), *v);
        }
    }
}
