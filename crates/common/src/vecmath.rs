//! Vector arithmetic shared by search, evaluation, training and serving: the
//! one dot product of the library.

/// Dot product with eight independent accumulators, so the compiler keeps
/// it in SIMD registers.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::dot;

    #[test]
    fn eight_lane_sum_covers_the_tail() {
        let a: Vec<f32> = (1..=11).map(|x| x as f32).collect();
        let b = vec![2.0f32; 11];
        // 2 * (1 + ... + 11) = 132, with 3 elements past the 8-wide chunk.
        assert_eq!(dot(&a, &b), 132.0);
        assert_eq!(dot(&[], &[]), 0.0);
    }
}
