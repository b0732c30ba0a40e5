//! Training objectives, one file each, and the registry that names them.
//!
//! An objective is a loss over one batch's L2-normalised features. Each file
//! holds one objective, its typed parameters (config keys of the same names)
//! and its [`Registered`] entry; [`REGISTRY`] lists them all. Adding an
//! objective is one new file plus one line in [`REGISTRY`] (and a field in
//! [`ObjectiveParams`] when it has parameters).
//!
//! The contrastive ones follow open_clip (`open_clip/loss.py`); the seed
//! documents' ones are written from their formulas, and
//! `scripts/gen_objective_fixtures.py` writes the same formulas in torch
//! (`tests/train_parity.rs` holds values and gradients to 1e-5).

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::Result;

pub mod adversarial;
pub mod daa;
pub mod distill;
pub mod geometric;
mod hard_negatives;
pub mod infonce;
pub mod siglip;
pub mod triplet;

pub use adversarial::{AdvLoss, AdvParams, Adversarial};
pub use daa::{Daa, DaaParams};
pub use distill::{Distill, DistillParams};
pub use geometric::{Geometric, GeometricParams};
pub use infonce::{DistilledInfoNce, InfoNce, MomentumParams};
pub use siglip::SigLip;
pub use triplet::{Triplet, TripletMode, TripletParams};

/// What an objective sees of one batch.
pub struct Batch<'a> {
    /// L2-normalised image features [B, P].
    pub image: &'a Tensor,
    /// L2-normalised text features [B, P]; row i pairs with image row i.
    pub text: &'a Tensor,
    /// The learnable log temperature (a scalar).
    pub log_scale: &'a Tensor,
    /// SigLIP's learnable bias (a scalar), when the model has one.
    pub bias: Option<&'a Tensor>,
    /// A frozen teacher's view of the same batch (distillation).
    pub teacher: Option<Teacher<'a>>,
}

/// A teacher's L2-normalised features of the batch and its log temperature,
/// all without a graph.
#[derive(Clone, Copy)]
pub struct Teacher<'a> {
    pub image: &'a Tensor,
    pub text: &'a Tensor,
    pub log_scale: &'a Tensor,
}

pub trait Objective: Send + Sync {
    fn name(&self) -> &str;
    /// The loss of a batch (a scalar tensor).
    fn loss(&self, b: &Batch) -> Result<Tensor>;
    /// open_clip's `--local-loss` under data parallelism: the loss of the
    /// batch's rows `rows` only (those images against every text and, for a
    /// symmetric loss, those texts against every image), normalised so that
    /// the mean over the ranks' rows is [`Objective::loss`]. `None`: this
    /// objective has no local form.
    fn local_loss(&self, _b: &Batch, _rows: std::ops::Range<usize>) -> Option<Result<Tensor>> {
        None
    }
    /// Trainable parameters of the objective itself (a discriminator), named;
    /// they join the optimiser and the training state.
    fn vars(&self) -> Vec<(String, Var)> {
        Vec::new()
    }
}

/// What objectives with their own parameters are built for.
pub struct ObjectiveEnv<'a> {
    /// The width of the projected features.
    pub dim: usize,
    pub seed: u64,
    pub device: &'a Device,
    /// The distillation teacher's feature width, when there is a teacher.
    pub teacher_dim: Option<usize>,
}

/// An objective's entry in the registry: its name (and aliases) in
/// `--objective`, and how it is built from the run's parameters.
pub struct Registered {
    pub name: &'static str,
    pub aliases: &'static [&'static str],
    pub build: fn(&ObjectiveParams, &ObjectiveEnv) -> Result<Box<dyn Objective>>,
}

/// Every objective `--objective` accepts (`ewc` acts on the weights and is
/// handled by the trainer; see `train::ewc`).
pub const REGISTRY: &[Registered] = &[
    infonce::REGISTERED,
    siglip::REGISTERED,
    daa::REGISTERED,
    triplet::REGISTERED,
    geometric::REGISTERED,
    adversarial::REGISTERED,
    distill::REGISTERED,
];

/// The registry entry called `name` (or one of its aliases).
pub fn lookup(name: &str) -> Option<&'static Registered> {
    REGISTRY
        .iter()
        .find(|r| r.name == name || r.aliases.contains(&name))
}

/// The names `--objective` accepts, for messages and help.
pub fn available() -> String {
    let mut v: Vec<&str> = REGISTRY.iter().map(|r| r.name).collect();
    v.push("ewc");
    v.join(", ")
}

/// Every objective's tunables, each objective's own struct flattened so the
/// config keys stay flat (`daa_temp`, `triplet_margin`, ...).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ObjectiveParams {
    #[serde(flatten)]
    pub daa: DaaParams,
    #[serde(flatten)]
    pub triplet: TripletParams,
    #[serde(flatten)]
    pub geometric: GeometricParams,
    #[serde(flatten)]
    pub distill: DistillParams,
    #[serde(flatten)]
    pub adv: AdvParams,
    #[serde(flatten)]
    pub momentum: MomentumParams,
}

fn eye(n: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
    Ok(Tensor::eye(n, dtype, dev)?)
}

/// exp(log_scale) · image · textᵀ, as `logits_per_image`.
pub fn logits_per_image(b: &Batch) -> Result<Tensor> {
    let scale = b.log_scale.exp()?;
    Ok(b.image.matmul(&b.text.t()?)?.broadcast_mul(&scale)?)
}
