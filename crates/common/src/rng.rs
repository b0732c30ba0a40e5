//! The one seedable random generator of the library: splitmix64, whose whole
//! state is one u64, so a training run's data order is saved and resumed
//! exactly and a seeded generation is reproducible.

use serde::{Deserialize, Serialize};

/// splitmix64: a tiny, seedable generator whose whole state is one u64, so
/// the data order is saved and resumed exactly.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    /// Uniform in [0, 1), from the top 24 bits.
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// `n` draws uniform in [−bound, bound): torch's `nn.Linear` init with
    /// bound 1/√fan_in.
    pub fn symmetric(&mut self, n: usize, bound: f64) -> Vec<f32> {
        (0..n)
            .map(|_| ((self.uniform() as f64 * 2.0 - 1.0) * bound) as f32)
            .collect()
    }
    /// `n` draws from Normal(0, std), by Box–Muller (one draw per pair of
    /// uniforms, the cosine branch).
    pub fn normal(&mut self, n: usize, std: f64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let u1 = (self.uniform() as f64).max(1e-12);
                let u2 = self.uniform() as f64;
                ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * std) as f32
            })
            .collect()
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Rng;

    #[test]
    fn splitmix64_reference_values_and_ranges() {
        // Reference values of splitmix64 seeded with 0.
        let mut r = Rng(0);
        assert_eq!(r.next_u64(), 0xE220A8397B1DCDAF);
        assert_eq!(r.next_u64(), 0x6E789E6AA1B965F4);
        let mut r = Rng(7);
        for _ in 0..1000 {
            let u = r.uniform();
            assert!((0.0..1.0).contains(&u));
            assert!(r.below(5) < 5);
        }
    }
}
