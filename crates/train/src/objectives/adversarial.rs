//! Adversarial modality alignment: a small MLP discriminator learns to tell
//! image features from text features, and the encoders learn, through a
//! gradient-reversal layer (Ganin & Lempitsky 2015), to make them
//! indistinguishable. One loss and one backward pass train both: the
//! discriminator's parameters get the gradient of its classification loss,
//! the features get it reversed and scaled by `adv_reverse`.
//!
//! - `bce`: binary cross-entropy, images labelled 1 and texts 0 (means).
//! - `wgan`: a critic, mean D(text) − mean D(image).
//! - `adv_gp` > 0 adds WGAN-GP's penalty (Gulrajani et al. 2017) on points
//!   between each image and its caption: gp · mean((‖∇ₓD(x̂)‖ − 1)²). For a
//!   one-hidden-layer ReLU MLP, ∇ₓD(x) = W1ᵀ (1[W1x + b1 > 0] ⊙ w2), written
//!   out here because candle has no double backward; the reference script
//!   checks it against torch's `autograd.grad(create_graph=True)`.
//! - `adv_spectral` divides both weight matrices by their largest singular
//!   value, estimated by one power iteration per forward pass from a
//!   persistent vector, as torch's `spectral_norm` does in training mode.
//!
//! The discriminator's weights are trainable variables of the run: they join
//! the optimiser and the training state, not the exported checkpoint. A
//! resumed run continues exactly, except that spectral norm's power-iteration
//! vector starts afresh.

use std::sync::Mutex;

use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::{Batch, Objective, Registered};
use crate::rng::Rng;
use crate::Result;

pub const REGISTERED: Registered = Registered {
    name: "adversarial",
    aliases: &[],
    build: |p, env| {
        Ok(Box::new(Adversarial::new(
            env.dim,
            p.adv.clone(),
            env.seed,
            env.device,
        )?))
    },
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdvLoss {
    Bce,
    Wgan,
}

impl std::str::FromStr for AdvLoss {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "bce" => Ok(Self::Bce),
            "wgan" => Ok(Self::Wgan),
            o => Err(format!("adversarial loss `{o}`: expected bce or wgan")),
        }
    }
}

/// The discriminator's settings (config keys `adv_*`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdvParams {
    pub adv_hidden: usize,
    pub adv_loss: AdvLoss,
    /// The gradient-reversal scale on the features.
    pub adv_reverse: f64,
    /// WGAN-GP's weight (0: off).
    pub adv_gp: f64,
    pub adv_spectral: bool,
}

impl Default for AdvParams {
    fn default() -> Self {
        Self {
            adv_hidden: 256,
            adv_loss: AdvLoss::Bce,
            adv_reverse: 1.0,
            adv_gp: 0.0,
            adv_spectral: false,
        }
    }
}

/// Identity forward; −scale × the gradient backward: f.detach() + (f −
/// f.detach())·(−s) is f exactly in value (the difference is exactly 0) and
/// has derivative −s.
pub fn reverse_gradient(f: &Tensor, scale: f64) -> Result<Tensor> {
    let d = f.detach();
    Ok((&d + ((f - &d)? * -scale)?)?)
}

pub struct Adversarial {
    pub params: AdvParams,
    w1: Var,
    b1: Var,
    w2: Var,
    b2: Var,
    /// Power-iteration vectors of W1 and W2 (spectral norm).
    u: Mutex<(Tensor, Tensor)>,
    seed: u64,
}

impl Adversarial {
    /// A fresh discriminator on `dim`-wide features, initialised as torch's
    /// `nn.Linear` (uniform ±1/√fan_in) from `seed`.
    pub fn new(dim: usize, params: AdvParams, seed: u64, dev: &Device) -> Result<Self> {
        let mut r = Rng(seed ^ 0xAD7E_25A1);
        let mut uniform = |n: usize, bound: f64| r.symmetric(n, bound);
        let h = params.adv_hidden;
        let (k1, k2) = (1.0 / (dim as f64).sqrt(), 1.0 / (h as f64).sqrt());
        let t = |v: Vec<f32>, shape: (usize, usize)| Tensor::from_vec(v, shape, dev);
        let w1 = Var::from_tensor(&t(uniform(h * dim, k1), (h, dim))?)?;
        let b1 = Var::from_tensor(&Tensor::from_vec(uniform(h, k1), h, dev)?)?;
        let w2 = Var::from_tensor(&t(uniform(h, k2), (1, h))?)?;
        let b2 = Var::from_tensor(&Tensor::from_vec(uniform(1, k2), 1, dev)?)?;
        let mut r = Rng(seed ^ 0x05EC_70A1);
        let mut unit = |n: usize| -> Result<Tensor> {
            let t = Tensor::from_vec(r.symmetric(n, 0.5), n, dev)?;
            Ok(t.broadcast_div(&t.sqr()?.sum_all()?.sqrt()?)?)
        };
        let u = (unit(h)?, unit(1)?);
        Ok(Self {
            params,
            w1,
            b1,
            w2,
            b2,
            u: Mutex::new(u),
            seed,
        })
    }

    /// Replaces the weights and power-iteration vectors (the parity test).
    pub fn set(
        &self,
        w1: &Tensor,
        b1: &Tensor,
        w2: &Tensor,
        b2: &Tensor,
        u: (Tensor, Tensor),
    ) -> Result<()> {
        self.w1.set(w1)?;
        self.b1.set(b1)?;
        self.w2.set(w2)?;
        self.b2.set(b2)?;
        *self.u.lock().expect("u lock") = u;
        Ok(())
    }

    /// W / σ(W) with one power iteration from the stored u (updated), as
    /// torch's spectral_norm: v = norm(Wᵀu), u = norm(Wv), σ = uᵀWv; u and v
    /// carry no gradient.
    fn spectral(w: &Tensor, u: &mut Tensor) -> Result<Tensor> {
        let wd = w.detach();
        let norm = |t: Tensor| -> Result<Tensor> {
            let n = t.sqr()?.sum_all()?.sqrt()?.maximum(1e-12f32)?;
            Ok(t.broadcast_div(&n)?)
        };
        let v = norm(wd.t()?.matmul(&u.unsqueeze(1)?)?.squeeze(1)?)?;
        let nu = norm(wd.matmul(&v.unsqueeze(1)?)?.squeeze(1)?)?;
        let sigma = nu
            .unsqueeze(0)?
            .matmul(&w.matmul(&v.unsqueeze(1)?)?)?
            .squeeze(0)?
            .squeeze(0)?;
        *u = nu;
        Ok(w.broadcast_div(&sigma)?)
    }

    /// The effective weights of this forward pass.
    fn weights(&self) -> Result<(Tensor, Tensor)> {
        let (w1, w2) = (self.w1.as_tensor(), self.w2.as_tensor());
        if !self.params.adv_spectral {
            return Ok((w1.clone(), w2.clone()));
        }
        let mut u = self.u.lock().expect("u lock");
        let (mut u1, mut u2) = (u.0.clone(), u.1.clone());
        let r = (Self::spectral(w1, &mut u1)?, Self::spectral(w2, &mut u2)?);
        *u = (u1, u2);
        Ok(r)
    }

    /// D(x): [n, P] → [n] logits, and the hidden pre-activations.
    fn forward(&self, x: &Tensor, w1: &Tensor, w2: &Tensor) -> Result<(Tensor, Tensor)> {
        let pre = x.matmul(&w1.t()?)?.broadcast_add(self.b1.as_tensor())?;
        let out = pre
            .relu()?
            .matmul(&w2.t()?)?
            .broadcast_add(self.b2.as_tensor())?
            .squeeze(1)?;
        Ok((out, pre))
    }

    /// The loss with WGAN-GP's interpolation weights given ([n]).
    pub fn loss_with_eps(&self, b: &Batch, eps: &Tensor) -> Result<Tensor> {
        let (w1, w2) = self.weights()?;
        let s = self.params.adv_reverse;
        let (di, _) = self.forward(&reverse_gradient(b.image, s)?, &w1, &w2)?;
        let (dt, _) = self.forward(&reverse_gradient(b.text, s)?, &w1, &w2)?;
        let mut loss = match self.params.adv_loss {
            // BCE with logits: softplus(−z) for label 1, softplus(z) for 0.
            AdvLoss::Bce => {
                ((softplus(&di.neg()?)?.mean_all()? + softplus(&dt)?.mean_all()?)? * 0.5)?
            }
            AdvLoss::Wgan => (dt.mean_all()? - di.mean_all()?)?,
        };
        if self.params.adv_gp > 0.0 {
            let e = eps.unsqueeze(1)?;
            let xh = (b.image.detach().broadcast_mul(&e)?
                + b.text.detach().broadcast_mul(&(e.neg()? + 1.0)?)?)?;
            let (_, pre) = self.forward(&xh, &w1, &w2)?;
            let mask = pre.gt(0f32)?.to_dtype(w1.dtype())?.detach();
            // ∇ₓD(x̂) per row: (mask ⊙ w2) W1.
            let g = mask.broadcast_mul(&w2)?.matmul(&w1)?;
            let norm = g.sqr()?.sum(1)?.sqrt()?;
            loss = (loss + ((norm - 1.0)?.sqr()?.mean_all()? * self.params.adv_gp)?)?;
        }
        Ok(loss)
    }
}

/// softplus(x) = max(x, 0) + log(1 + e^{−|x|}), stable.
fn softplus(x: &Tensor) -> Result<Tensor> {
    Ok((x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?)
}

impl Objective for Adversarial {
    fn name(&self) -> &str {
        "adversarial"
    }
    fn loss(&self, b: &Batch) -> Result<Tensor> {
        // WGAN-GP's interpolation weights, uniform in [0, 1): drawn from a
        // hash of each row's features and the seed, so a resumed run (same
        // weights, same batch) draws the same ones without saving a generator.
        let rows: Vec<Vec<f32>> = b
            .image
            .detach()
            .to_dtype(candle_core::DType::F32)?
            .to_vec2()?;
        let eps: Vec<f32> = rows
            .iter()
            .map(|row| {
                let mut r = Rng(self.seed);
                for v in row {
                    r.0 = r.0.rotate_left(5) ^ v.to_bits() as u64;
                    r.next_u64();
                }
                r.uniform()
            })
            .collect();
        let eps = Tensor::from_vec(eps, rows.len(), b.image.device())?.to_dtype(b.image.dtype())?;
        self.loss_with_eps(b, &eps)
    }
    fn vars(&self) -> Vec<(String, Var)> {
        [
            ("adversary.fc1.weight", &self.w1),
            ("adversary.fc1.bias", &self.b1),
            ("adversary.fc2.weight", &self.w2),
            ("adversary.fc2.bias", &self.b2),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_string(), v.clone()))
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradient_reversal_is_the_identity_forward_and_negates_backward() {
        let x = Var::new(&[1.5f32, -2.0, 0.25], &Device::Cpu).unwrap();
        let y = reverse_gradient(x.as_tensor(), 0.5).unwrap();
        assert_eq!(y.to_vec1::<f32>().unwrap(), vec![1.5, -2.0, 0.25]);
        let g = (y * 3.0).unwrap().sum_all().unwrap().backward().unwrap();
        let gx: Vec<f32> = g.get(x.as_tensor()).unwrap().to_vec1().unwrap();
        assert_eq!(gx, vec![-1.5; 3]);
    }
}
