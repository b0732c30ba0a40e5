//! Attention on flat buffers: packed sequences' segments, their masks, and softmax(q k^T / sqrt(d)) v per (segment, head) in parallel.

use super::*;

/// Which positions a query may attend to, within its own sequence.
#[derive(Clone, Copy)]
pub enum Mask<'a> {
    None,
    /// Key j is visible to query i only when j <= i.
    Causal,
    /// Additive per-key bias, one value per row of the flat buffer (0, or a
    /// large negative for padding).
    Keys(&'a [f32]),
}

/// `n` sequences of `t` rows each, back to back.
pub fn uniform_segments(n: usize, t: usize) -> Vec<(usize, usize)> {
    (0..n).map(|i| (i * t, t)).collect()
}

/// Multi-head attention over a fused qkv buffer [rows, 3C] (q | k | v, heads
/// contiguous within each), writing the context into `ctx` [rows, C].
/// `segments` are (first row, length) of each sequence: attention never
/// crosses them, so sequences of different lengths can be packed without
/// padding.
///
/// Panics unless `heads` divides `c`, `qkv` is whole rows of 3C, `ctx` has
/// as many rows of C, and the segments are in order, disjoint and inside
/// them: the products below use raw pointers, and each (segment, head)
/// task writes its own block of `ctx`.
pub fn attention(
    qkv: &[f32],
    ctx: &mut [f32],
    segments: &[(usize, usize)],
    heads: usize,
    c: usize,
    mask: Mask,
) {
    assert!(
        heads > 0 && c > 0 && c.is_multiple_of(heads),
        "attention: {heads} heads into width {c}"
    );
    let c3 = c.checked_mul(3).expect("attention: width overflows");
    assert_eq!(qkv.len() % c3, 0, "attention: qkv is not rows of 3 x {c}");
    let rows = qkv.len() / c3;
    assert_eq!(ctx.len(), rows * c, "attention: ctx is not [{rows}, {c}]");
    let mut end = 0;
    for &(start, t) in segments {
        assert!(
            start >= end && start.checked_add(t).is_some_and(|e| e <= rows),
            "attention: segment ({start}, {t}) overlaps or passes {rows} rows"
        );
        end = start + t;
    }
    let d = c / heads;
    let scale = 1.0 / (d as f32).sqrt();
    let longest = segments.iter().map(|s| s.1).max().unwrap_or(0);
    let ctx_ptr = SendPtr(ctx.as_mut_ptr());
    (0..segments.len() * heads).into_par_iter().for_each_init(
        || vec![0f32; longest * longest],
        |buf, job| {
            let ((start, t), h) = (segments[job / heads], job % heads);
            let scores = &mut buf[..t * t];
            let base = start * 3 * c;
            let q = qkv[base + h * d..].as_ptr();
            let k = qkv[base + c + h * d..].as_ptr();
            let v = qkv[base + 2 * c + h * d..].as_ptr();
            let row = 3 * c as isize;
            // SAFETY: q, k and v rows are `row` apart and hold d values each;
            // `scores` is t x t; the ctx block of (segment, h) is t rows of d
            // values at stride c, written by this task only.
            unsafe {
                gemm::gemm(
                    t,
                    t,
                    d,
                    scores.as_mut_ptr(),
                    1,
                    t as isize,
                    false,
                    q,
                    1,
                    row,
                    k,
                    row,
                    1,
                    0.0,
                    scale,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
            softmax_rows(scores, t, start, mask);
            // SAFETY: as above; segments are disjoint (asserted), so this
            // (segment, head) block of ctx is written by this task alone.
            unsafe {
                let dst = ctx_ptr.get().add(start * c + h * d);
                gemm::gemm(
                    t,
                    d,
                    t,
                    dst,
                    1,
                    c as isize,
                    false,
                    scores.as_ptr(),
                    1,
                    t as isize,
                    v,
                    1,
                    row,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
        },
    );
}

/// Row-wise softmax of one sequence's t x t scores in place, after masking;
/// `start` is the sequence's first row (for per-key masks).
pub fn softmax_rows(scores: &mut [f32], t: usize, start: usize, mask: Mask) {
    for (i, srow) in scores.chunks_mut(t).enumerate() {
        match mask {
            Mask::None => {}
            Mask::Causal => srow[i + 1..].fill(f32::NEG_INFINITY),
            Mask::Keys(m) => srow
                .iter_mut()
                .zip(&m[start..start + t])
                .for_each(|(s, &mv)| *s += mv),
        }
        let max = srow.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for s in srow.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        srow.iter_mut().for_each(|s| *s *= inv);
    }
}
