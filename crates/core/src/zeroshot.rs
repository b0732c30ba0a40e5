//! Zero-shot classification's scoring: class vectors from prompt ensembles,
//! and label probabilities as CLIP (a softmax at scale 100) or SigLIP (each
//! label's own sigmoid) give them. The prompts themselves (templates,
//! filling) are text preprocessing, in `preprocess::prompts`.

/// CLIP's prompt ensemble: `embeddings` holds `per_class` normalised prompt
/// embeddings for each class in turn; each class vector is their mean,
/// normalised.
pub fn ensemble(embeddings: &[Vec<f32>], per_class: usize) -> Vec<Vec<f32>> {
    embeddings
        .chunks(per_class.max(1))
        .map(|group| {
            let mut mean = vec![0f32; group[0].len()];
            for v in group {
                for (m, x) in mean.iter_mut().zip(v) {
                    *m += x;
                }
            }
            for m in &mut mean {
                *m /= group.len() as f32;
            }
            let norm = mean.iter().map(|x| x * x).sum::<f32>().sqrt();
            mean.iter().map(|x| x / norm).collect()
        })
        .collect()
}

/// CLIP's logit scale for zero-shot probabilities.
pub const ZERO_SHOT_SCALE: f64 = 100.0;

/// How zero-shot scores become label probabilities.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ZeroShotScoring {
    /// CLIP: the softmax over the labels of [`ZERO_SHOT_SCALE`] · cosine.
    Softmax,
    /// SigLIP: each label's own sigmoid of `scale · cosine + bias` (the
    /// model's logit scale, exponentiated, and bias), as transformers'
    /// zero-shot pipeline gives for SigLIP; they need not sum to 1.
    Sigmoid { scale: f64, bias: f64 },
}

/// Zero-shot label probabilities of one unit image vector against unit
/// class vectors, per `scoring`, and the best class (the first among
/// equals). The one implementation for `clasp classify` and the server's
/// `/v1/classify`.
pub fn class_probabilities(
    image: &[f32],
    classes: &[Vec<f32>],
    scoring: ZeroShotScoring,
) -> (usize, Vec<f64>) {
    let cos: Vec<f64> = classes
        .iter()
        .map(|c| crate::vecmath::dot(image, c) as f64)
        .collect();
    let p: Vec<f64> = match scoring {
        ZeroShotScoring::Softmax => {
            let logits: Vec<f64> = cos.iter().map(|c| ZERO_SHOT_SCALE * c).collect();
            let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
            let z: f64 = e.iter().sum();
            e.iter().map(|x| x / z).collect()
        }
        ZeroShotScoring::Sigmoid { scale, bias } => cos
            .iter()
            .map(|c| 1.0 / (1.0 + (-(scale * c + bias)).exp()))
            .collect(),
    };
    let best = (0..p.len()).fold(0, |b, j| if p[j] > p[b] { j } else { b });
    (best, p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_probabilities_are_a_softmax_at_scale_100() {
        let classes = vec![vec![1.0, 0.0], vec![0.0, 1.0]];
        let (best, p) = class_probabilities(&[0.6, 0.8], &classes, ZeroShotScoring::Softmax);
        assert_eq!(best, 1);
        // softmax(60, 80): p1 = 1 / (1 + e^-20).
        assert!((p[1] - 1.0 / (1.0 + (-20f64).exp())).abs() < 1e-12);
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        // Ties go to the first class.
        assert_eq!(
            class_probabilities(&[1.0, 1.0], &classes, ZeroShotScoring::Softmax).0,
            0
        );
    }

    #[test]
    fn sigmoid_scoring_gives_each_label_its_own_probability() {
        let classes = vec![vec![1.0, 0.0], vec![0.0, 1.0]];
        let scoring = ZeroShotScoring::Sigmoid {
            scale: 10.0,
            bias: -5.0,
        };
        // Cosines 0.5 and 0.75 (exact in f32): sigmoid(10 * 0.5 - 5) = 0.5,
        // sigmoid(10 * 0.75 - 5) = sigmoid(2.5).
        let (best, p) = class_probabilities(&[0.5, 0.75], &classes, scoring);
        assert_eq!(best, 1);
        assert!((p[0] - 0.5).abs() < 1e-12);
        assert!((p[1] - 1.0 / (1.0 + (-2.5f64).exp())).abs() < 1e-12);
    }
}
