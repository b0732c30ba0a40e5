//! Choosing the next token from logits: greedy, or seeded sampling with
//! temperature, top-k and top-p, after a repetition penalty. The order and
//! the definitions are transformers' logits processors: repetition penalty
//! (divide positive logits, multiply negative ones, for every token already in
//! the sequence), then temperature, top-k, top-p (keep the smallest set whose
//! probability reaches p, always at least one token).

use crate::rng::Rng;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    /// 1.0 means no top-p cut.
    pub top_p: f32,
    /// 1.0 means no penalty.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// Checks the ranges, naming the parameter at fault.
    pub fn validate(&self) -> Result<(), String> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return Err(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

/// A sampler for one sequence, holding its own seeded generator.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = Rng(params.seed);
        Self { params, rng }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The next token, given the logits and the tokens so far (prompt and
    /// generated, for the repetition penalty).
    pub fn sample(&mut self, logits: &[f32], previous: &[u32]) -> u32 {
        let mut l = logits.to_vec();
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let mut seen = std::collections::HashSet::new();
            for &t in previous {
                if seen.insert(t) {
                    if let Some(v) = l.get_mut(t as usize) {
                        *v = if *v < 0.0 {
                            *v * p.repetition_penalty
                        } else {
                            *v / p.repetition_penalty
                        };
                    }
                }
            }
        }
        if p.is_greedy() {
            return argmax(&l);
        }
        for v in l.iter_mut() {
            *v /= p.temperature;
        }
        // Candidates sorted by logit, descending (stable: lower id first).
        let mut idx: Vec<u32> = (0..l.len() as u32).collect();
        idx.sort_by(|&a, &b| l[b as usize].total_cmp(&l[a as usize]).then(a.cmp(&b)));
        if p.top_k > 0 && p.top_k < idx.len() {
            idx.truncate(p.top_k);
        }
        let max = l[idx[0] as usize];
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| ((l[i as usize] - max) as f64).exp())
            .collect();
        let z: f64 = probs.iter().sum();
        for q in probs.iter_mut() {
            *q /= z;
        }
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (n, q) in probs.iter().enumerate() {
                acc += q;
                if acc >= p.top_p as f64 {
                    keep = n + 1;
                    break;
                }
            }
            probs.truncate(keep);
            idx.truncate(keep);
            let z: f64 = probs.iter().sum();
            for q in probs.iter_mut() {
                *q /= z;
            }
        }
        let u = self.rng.uniform() as f64;
        let mut acc = 0.0;
        for (q, &i) in probs.iter().zip(&idx) {
            acc += q;
            if u < acc {
                return i;
            }
        }
        *idx.last().unwrap_or(&0)
    }
}

/// Index of the largest value; the lowest index among ties (as torch.argmax).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Softmax in f64 (for KL and probabilities in reports).
pub fn softmax(v: &[f32]) -> Vec<f64> {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = v.iter().map(|&x| (x as f64 - max).exp()).collect();
    let z: f64 = e.iter().sum();
    e.into_iter().map(|x| x / z).collect()
}

/// KL(p || q) between the next-token distributions of two logit vectors.
pub fn kl_divergence(p_logits: &[f32], q_logits: &[f32]) -> f64 {
    let p = softmax(p_logits);
    let q = softmax(q_logits);
    p.iter()
        .zip(&q)
        .filter(|(a, _)| **a > 0.0)
        .map(|(a, b)| a * (a / b.max(1e-300)).ln())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0], &[]), 1);
    }

    #[test]
    fn repetition_penalty_matches_transformers_rule() {
        // Token 0 (logit 2.0) seen: 2.0 / 2 = 1.0 < 1.5, so token 1 wins.
        // Token 2 (logit -1.0) seen: -1.0 * 2 = -2.0.
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        let mut s = Sampler::new(p);
        assert_eq!(s.sample(&[2.0, 1.5, -1.0], &[0, 0, 2]), 1);
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let logits = [0.5, 2.0, 1.9, -3.0];
        for p in [
            SamplingParams {
                temperature: 1.0,
                top_k: 1,
                seed: 3,
                ..Default::default()
            },
            SamplingParams {
                temperature: 1.0,
                top_p: 1e-6,
                seed: 4,
                ..Default::default()
            },
        ] {
            let mut s = Sampler::new(p);
            for _ in 0..50 {
                assert_eq!(s.sample(&logits, &[]), 1);
            }
        }
    }

    #[test]
    fn sampling_follows_the_softmax_and_is_seeded() {
        let logits = [0.0f32, (3.0f32).ln(), f32::NEG_INFINITY];
        let p = SamplingParams {
            temperature: 1.0,
            seed: 11,
            ..Default::default()
        };
        let mut s = Sampler::new(p.clone());
        let n = 20_000;
        let draws: Vec<u32> = (0..n).map(|_| s.sample(&logits, &[])).collect();
        let ones = draws.iter().filter(|&&t| t == 1).count() as f64 / n as f64;
        assert!((ones - 0.75).abs() < 0.015, "{ones}");
        assert!(!draws.contains(&2));
        let mut again = Sampler::new(p);
        let second: Vec<u32> = (0..n).map(|_| again.sample(&logits, &[])).collect();
        assert_eq!(draws, second);
        // top_p 0.7 keeps only token 1 (0.75 >= 0.7).
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.7,
            seed: 1,
            ..Default::default()
        });
        assert!((0..500).all(|_| s.sample(&logits, &[]) == 1));
    }

    #[test]
    fn kl_is_zero_for_equal_and_positive_otherwise() {
        let a = [1.0, 2.0, 3.0];
        assert!(kl_divergence(&a, &a).abs() < 1e-12);
        // Shifting all logits does not change the distribution.
        assert!(kl_divergence(&a, &[11.0, 12.0, 13.0]).abs() < 1e-12);
        let k = kl_divergence(&a, &[3.0, 2.0, 1.0]);
        // p = softmax(1,2,3); KL = sum p_i (l_i - m_i) since both have the same normaliser.
        let p = softmax(&a);
        let want = p[0] * (-2.0) + p[2] * 2.0;
        assert!((k - want).abs() < 1e-12, "{k} {want}");
    }
}
