//! Hard in-batch negatives for the hinge objectives (triplet, geometric).
//! They are picked on detached similarities (ties go to the lowest index, as
//! torch's `max` does); the gradient then flows through the picked
//! similarities only, as through torch's `max`/`topk`.

use candle_core::{DType, Tensor};

use crate::Result;

/// 0/1 masks over `scores` [n, n] that mark, in each row and in each column,
/// the `k` largest off-diagonal entries; ties go to the lower index. Read
/// from one copy of the scores.
fn hardest_masks(scores: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
    let n = scores.dim(0)?;
    let s: Vec<Vec<f32>> = scores.detach().to_dtype(DType::F32)?.to_vec2()?;
    let mask = |by_row: bool| -> Result<Tensor> {
        let mut m = vec![0f32; n * n];
        for a in 0..n {
            let at = |o: usize| if by_row { s[a][o] } else { s[o][a] };
            let mut others: Vec<usize> = (0..n).filter(|&o| o != a).collect();
            // Stable sort: equal scores keep index order.
            others.sort_by(|&x, &y| at(y).total_cmp(&at(x)));
            for &o in others.iter().take(k) {
                m[if by_row { a * n + o } else { o * n + a }] = 1.0;
            }
        }
        Ok(Tensor::from_vec(m, (n, n), scores.device())?.to_dtype(scores.dtype())?)
    };
    Ok((mask(true)?, mask(false)?))
}

/// Hinge costs of every (anchor, negative) pair, both directions:
/// `[image anchors: margin + s[i, j] − s[i, i], text anchors: margin + s[i, j] − s[j, j]]`,
/// each clamped at 0. Diagonal entries are not negatives: callers mask them.
fn hinge_costs(s: &Tensor, margin: f64) -> Result<(Tensor, Tensor)> {
    let n = s.dim(0)?;
    let d = (s * Tensor::eye(n, s.dtype(), s.device())?)?.sum(1)?; // the positives, [n]
    let by_image = (s.broadcast_sub(&d.reshape((n, 1))?)? + margin)?.relu()?;
    let by_text = (s.broadcast_sub(&d.reshape((1, n))?)? + margin)?.relu()?;
    Ok((by_image, by_text))
}

/// The hinge costs of each anchor's `k` hardest negatives, image anchors
/// (rows of `s`) and text anchors (columns), summed. Hardest by cost is
/// hardest by similarity within an anchor.
pub(super) fn hardest_hinge_sum(s: &Tensor, margin: f64, k: usize) -> Result<Tensor> {
    let (by_image, by_text) = hinge_costs(s, margin)?;
    let (mi, mt) = hardest_masks(s, k)?;
    Ok(((by_image * mi)?.sum_all()? + (by_text * mt)?.sum_all()?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn hardest_mask_picks_the_largest_off_diagonal_with_ties_to_the_lower_index() {
        let s = Tensor::new(
            &[
                [9f32, 1., 1., 0.],
                [5., 9., 2., 5.],
                [0., 3., 9., 3.],
                [1., 1., 1., 1.],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let m: Vec<Vec<f32>> = hardest_masks(&s, 1).unwrap().0.to_vec2().unwrap();
        assert_eq!(
            m,
            vec![
                vec![0., 1., 0., 0.],
                vec![1., 0., 0., 0.],
                vec![0., 1., 0., 0.],
                vec![1., 0., 0., 0.]
            ]
        );
        let c: Vec<Vec<f32>> = hardest_masks(&s, 2).unwrap().1.to_vec2().unwrap();
        // Column 0 (rows 1,2,3 hold 5, 0, 1): rows 1 and 3.
        assert_eq!((c[1][0], c[2][0], c[3][0]), (1., 0., 1.));
        for (j, row) in c.iter().enumerate() {
            assert_eq!(row[j], 0.);
        }
        for j in 0..4 {
            assert_eq!(c.iter().map(|row| row[j]).sum::<f32>(), 2.);
        }
    }
}
