//! clasp's CPU kernels: the fused f32 inference blocks (`cpu_kernels`), the
//! packed AVX-512 f32/bf16 GEMMs (`packed`), dynamic int8 with VNNI and AMX
//! (`int8`), and the differentiable fused ops that training uses, the llama
//! ones included (`grad_kernels`). Both the encoders and the language model
//! build on them; they know no model.

pub mod cpu_kernels;
pub mod grad_kernels;
pub mod int8;
pub mod packed;

use std::cell::Cell;

use serde::{Deserialize, Serialize};

#[cfg(test)]
use clasp_common::rng;
use clasp_common::{Error, Result};

/// A feed-forward activation, by the names transformers' configs use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    QuickGelu,
    /// Exact (erf) GELU, as torch's `nn.GELU()` and BERT's "gelu".
    Gelu,
    #[serde(alias = "gelu_pytorch_tanh", alias = "gelu_new")]
    GeluTanh,
    Relu,
}

thread_local! {
    static GRAD_MODE: Cell<bool> = const { Cell::new(false) };
}

/// Whether the current thread builds graphs for backprop. Inference kernels
/// that have no backward (candle's fused layer norm) are used only when off.
pub fn grad_mode() -> bool {
    GRAD_MODE.with(|g| g.get())
}

/// Turns grad mode on or off for this thread until the guard drops, which
/// restores the previous mode, also when the code in between panics or
/// returns early.
#[must_use = "grad mode reverts when the guard drops"]
pub fn grad_mode_guard(on: bool) -> GradModeGuard {
    GradModeGuard {
        prev: GRAD_MODE.with(|g| g.replace(on)),
    }
}

/// Restores the thread's previous grad mode on drop (see [`grad_mode_guard`]).
pub struct GradModeGuard {
    prev: bool,
}

impl Drop for GradModeGuard {
    fn drop(&mut self) {
        GRAD_MODE.with(|g| g.set(self.prev));
    }
}

#[cfg(test)]
mod grad_mode_tests {
    use super::*;

    #[test]
    fn the_guard_restores_the_mode_after_a_panic() {
        assert!(!grad_mode());
        let r = std::panic::catch_unwind(|| {
            let _g = grad_mode_guard(true);
            assert!(grad_mode());
            panic!("inside a step");
        });
        assert!(r.is_err());
        assert!(!grad_mode());
        {
            let _on = grad_mode_guard(true);
            let _off = grad_mode_guard(false);
            assert!(!grad_mode());
        }
        assert!(!grad_mode());
    }
}
