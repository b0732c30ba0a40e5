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

/// The score of a query against a stored row: their dot product when the
/// widths are equal, and when the row holds several vectors of the query's
/// width back to back (BLIP-2's query embeddings of one image), the best of
/// their dot products, as BLIP-2's ITC scores an image against a text.
/// The caller checks that the row's width is a multiple of the query's.
#[inline]
pub fn row_score(row: &[f32], query: &[f32]) -> f32 {
    if row.len() == query.len() {
        return dot(row, query);
    }
    row.chunks_exact(query.len())
        .map(|v| dot(v, query))
        .fold(f32::NEG_INFINITY, f32::max)
}

#[cfg(test)]
mod tests {
    use super::{dot, row_score};

    #[test]
    fn a_row_of_several_vectors_scores_its_best() {
        let q = [1.0f32, 0.0];
        assert_eq!(row_score(&[0.6, 0.8], &q), 0.6);
        assert_eq!(row_score(&[0.6, 0.8, -1.0, 0.0, 0.9, 0.1], &q), 0.9);
    }

    #[test]
    fn eight_lane_sum_covers_the_tail() {
        let a: Vec<f32> = (1..=11).map(|x| x as f32).collect();
        let b = vec![2.0f32; 11];
        // 2 * (1 + ... + 11) = 132, with 3 elements past the 8-wide chunk.
        assert_eq!(dot(&a, &b), 132.0);
        assert_eq!(dot(&[], &[]), 0.0);
    }
}
