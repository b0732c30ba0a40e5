//! Training: contrastive objectives, the trainable model and its checkpoints,
//! and the optimiser with its schedule.

pub mod adversarial;
pub mod align;
pub mod ewc;
pub mod loss;
pub mod mine;
pub mod model;
pub mod optim;
pub mod presets;
pub mod step;
pub mod trainer;
