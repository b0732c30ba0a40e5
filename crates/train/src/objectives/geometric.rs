//! The BCIF paper's geometric consistency loss, on cosine similarities.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::hard_negatives::hardest_hinge_sum;
use super::{Batch, Objective, Registered};
use crate::Result;

pub const REGISTERED: Registered = Registered {
    name: "geometric",
    aliases: &[],
    build: |p, _| {
        Ok(Box::new(Geometric {
            margin: p.geometric.geometric_margin,
            k: p.geometric.geometric_k,
        }))
    },
};

/// The geometric loss's parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GeometricParams {
    /// Geometric consistency margin.
    pub geometric_margin: f64,
    /// How many hardest negatives the geometric loss takes per anchor.
    pub geometric_k: usize,
}

impl Default for GeometricParams {
    fn default() -> Self {
        Self {
            geometric_margin: 0.3,
            geometric_k: 3,
        }
    }
}

/// The BCIF paper's geometric consistency loss: mean(max(0, s_neg − s_pos +
/// margin)) over the `k` hardest in-batch negatives of each anchor, image
/// anchors and text anchors alike. A batch of one has no negatives: 0.
pub struct Geometric {
    pub margin: f64,
    pub k: usize,
}

impl Objective for Geometric {
    fn name(&self) -> &str {
        "geometric"
    }
    fn loss(&self, b: &Batch) -> Result<Tensor> {
        let s = b.image.matmul(&b.text.t()?)?;
        let n = s.dim(0)?;
        let k = self.k.min(n.saturating_sub(1));
        if k == 0 {
            // Keeps the graph, so every feature gets a (zero) gradient.
            return Ok((s.sum_all()? * 0.0)?);
        }
        let total = hardest_hinge_sum(&s, self.margin, k)?;
        Ok((total / (2 * n * k) as f64)?)
    }
}
