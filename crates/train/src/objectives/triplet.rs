//! VSE++ triplet ranking with hard in-batch negatives, on cosine
//! similarities (no temperature).

use serde::{Deserialize, Serialize};

use super::hard_negatives::hardest_hinge_sum;
use super::{Batch, Objective, Registered};
use crate::Result;
use candle_core::Tensor;

pub const REGISTERED: Registered = Registered {
    name: "triplet",
    aliases: &[],
    build: |p, _| {
        Ok(Box::new(Triplet {
            margin: p.triplet.triplet_margin,
            mode: p.triplet.triplet_mode,
        }))
    },
};

/// The triplet loss's parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TripletParams {
    /// VSE++ margin.
    pub triplet_margin: f64,
    /// `max`: the hardest negative (VSE++'s max-violation); `sum`: all.
    pub triplet_mode: TripletMode,
}

impl Default for TripletParams {
    fn default() -> Self {
        Self {
            triplet_margin: 0.2,
            triplet_mode: TripletMode::Max,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TripletMode {
    Max,
    Sum,
}

impl std::str::FromStr for TripletMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "max" => Ok(Self::Max),
            "sum" => Ok(Self::Sum),
            o => Err(format!("triplet mode `{o}`: expected max or sum")),
        }
    }
}

/// VSE++ (Faghri et al.): a hinge with a margin between each positive pair
/// and its negatives, in both directions: image anchors against other
/// captions, caption anchors against other images. `Max` takes the hardest
/// negative per anchor (max-violation), `Sum` all of them. The sum over
/// anchors is divided by the batch size, so the weight means the same at any
/// batch size.
pub struct Triplet {
    pub margin: f64,
    pub mode: TripletMode,
}

impl Objective for Triplet {
    fn name(&self) -> &str {
        "triplet"
    }
    fn loss(&self, b: &Batch) -> Result<Tensor> {
        let s = b.image.matmul(&b.text.t()?)?;
        let n = s.dim(0)?;
        let k = match self.mode {
            TripletMode::Max => 1,
            TripletMode::Sum => n,
        };
        let total = hardest_hinge_sum(&s, self.margin, k)?;
        Ok((total / n as f64)?)
    }
}
