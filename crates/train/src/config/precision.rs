//! The compute type of a training run's towers.

use serde::{Deserialize, Serialize};

/// The compute type of the forward and backward passes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    /// bf16 towers (open_clip's `amp_bf16`): the variables, the optimiser,
    /// the logit scale and the loss stay f32. bf16 keeps f32's exponent
    /// range, so no loss scaling is needed. Made for CUDA; on the CPU it
    /// works but is slower than f32 (candle widens bf16 matmuls to f32).
    Bf16,
}

impl Precision {
    /// The dtype the towers compute in, when it is not f32.
    pub fn half(self) -> Option<candle_core::DType> {
        match self {
            Precision::F32 => None,
            Precision::Bf16 => Some(candle_core::DType::BF16),
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" | "fp32" => Ok(Self::F32),
            "bf16" | "amp_bf16" => Ok(Self::Bf16),
            other => Err(format!("unknown precision `{other}` (f32 or bf16)")),
        }
    }
}
