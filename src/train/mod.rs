//! Training: contrastive objectives (more to come: the optimiser, schedules
//! and the loop).

pub mod loss;
