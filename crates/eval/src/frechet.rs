//! The Fréchet distance between two sets of features: each set taken as a
//! Gaussian with its mean and its sample covariance (divisor n − 1),
//!
//! ```text
//! d² = |μa − μb|² + Tr(Σa) + Tr(Σb) − 2 Tr((Σa Σb)^½)
//! ```
//!
//! the formula of Heusel et al. (2017) as pytorch-fid computes it with
//! scipy's `sqrtm`. On Inception-v3's pool features it is FID; clasp has no
//! Inception weights, so it reports the distance on the tower it is given
//! (for example torchvision's ImageNet MobileNetV2), named for what it is.
//!
//! The trace of the square root is computed without a d × d square root:
//! with `Xa`, `Xb` the centred feature rows, `Σa Σb` and
//! `M Mᵀ / ((na − 1)(nb − 1))`, `M = Xa Xbᵀ`, share their non-zero
//! eigenvalues, so `Tr((Σa Σb)^½)` is the sum of `M`'s singular values over
//! `√((na − 1)(nb − 1))`: an eigen-decomposition of an
//! `min(na, nb)`-square symmetric matrix (nalgebra's), exact at any feature
//! width.

use nalgebra::DMatrix;

use crate::{Error, Result};

/// The Fréchet distance (the squared form, as FID reports it) between the
/// rows of `a` and of `b`, which must have one width and at least two rows
/// each.
pub fn frechet_distance(a: &[Vec<f32>], b: &[Vec<f32>]) -> Result<f64> {
    let d = a.first().map_or(0, Vec::len);
    if a.len() < 2 || b.len() < 2 {
        return Err(Error::Report(format!(
            "a Fréchet distance needs at least 2 feature rows a side ({} and {})",
            a.len(),
            b.len()
        )));
    }
    if d == 0 || a.iter().chain(b).any(|r| r.len() != d) {
        return Err(Error::Report(
            "the feature rows differ in width (or are empty)".into(),
        ));
    }
    let (xa, mu_a) = centred(a, d);
    let (xb, mu_b) = centred(b, d);
    let (ca, cb) = ((a.len() - 1) as f64, (b.len() - 1) as f64);
    let mean_term: f64 = mu_a.iter().zip(&mu_b).map(|(x, y)| (x - y).powi(2)).sum();
    let tr_a = xa.norm_squared() / ca;
    let tr_b = xb.norm_squared() / cb;
    let m = &xa * xb.transpose();
    // The smaller Gram matrix of M: the same non-zero eigenvalues.
    let gram = if m.nrows() <= m.ncols() {
        &m * m.transpose()
    } else {
        m.transpose() * &m
    };
    let eig = gram.symmetric_eigen();
    // The zero eigenvalues of a rank-deficient Gram matrix come out as
    // rounding noise of either sign, whose square roots would add up:
    // eigenvalues below the decomposition's relative precision count as 0.
    let top = eig.eigenvalues.iter().fold(0f64, |m, &l| m.max(l));
    let floor = top * 1e-12;
    let nuclear: f64 = eig
        .eigenvalues
        .iter()
        .map(|&l| if l > floor { l.sqrt() } else { 0.0 })
        .sum();
    let tr_sqrt = nuclear / (ca * cb).sqrt();
    Ok(mean_term + tr_a + tr_b - 2.0 * tr_sqrt)
}

/// The rows minus their mean, in f64, and the mean.
fn centred(rows: &[Vec<f32>], d: usize) -> (DMatrix<f64>, Vec<f64>) {
    let n = rows.len();
    let mut mu = vec![0f64; d];
    for r in rows {
        for (m, &x) in mu.iter_mut().zip(r) {
            *m += x as f64;
        }
    }
    mu.iter_mut().for_each(|m| *m /= n as f64);
    let x = DMatrix::from_fn(n, d, |i, j| rows[i][j] as f64 - mu[j]);
    (x, mu)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One-dimensional Gaussians: d² = (μa − μb)² + (σa − σb)².
    #[test]
    fn one_dimension_is_the_gaussians_closed_form() {
        let a: Vec<Vec<f32>> = [1.0, 2.0, 3.0, 4.0].iter().map(|&x| vec![x]).collect();
        let b: Vec<Vec<f32>> = [10.0, 14.0, 18.0].iter().map(|&x| vec![x]).collect();
        let (va, vb) = (5.0f64 / 3.0, 16.0f64);
        let want = (2.5f64 - 14.0).powi(2) + (va.sqrt() - vb.sqrt()).powi(2);
        assert!((frechet_distance(&a, &b).unwrap() - want).abs() < 1e-9);
        // A set against itself is at distance zero.
        assert!(frechet_distance(&a, &a).unwrap().abs() < 1e-9);
    }

    /// pytorch-fid's formula with scipy's `sqrtm` on seeded features
    /// (scripts/gen_frechet_fixtures.py), fewer and more features than rows.
    #[test]
    fn equals_pytorch_fids_formula_with_scipys_sqrtm() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/eval/frechet.json"
        );
        let f: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let rows = |v: &serde_json::Value| -> Vec<Vec<f32>> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|r| {
                    r.as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_f64().unwrap() as f32)
                        .collect()
                })
                .collect()
        };
        for c in f["cases"].as_array().unwrap() {
            let got = frechet_distance(&rows(&c["a"]), &rows(&c["b"])).unwrap();
            let want = c["fd"].as_f64().unwrap();
            assert!(
                (got - want).abs() < 1e-6 * want.max(1.0),
                "{}: {got} vs {want}",
                c["name"]
            );
        }
    }

    #[test]
    fn too_few_rows_and_ragged_rows_are_refused() {
        let one = vec![vec![1.0f32, 2.0]];
        let two = vec![vec![1.0f32, 2.0], vec![3.0, 4.0]];
        assert!(frechet_distance(&one, &two).is_err());
        let ragged = vec![vec![1.0f32, 2.0], vec![3.0]];
        assert!(frechet_distance(&two, &ragged).is_err());
    }
}
