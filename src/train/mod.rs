//! `cycletrain`: CycleGAN training with the original recipe, on CPU or CUDA.

pub mod config;
pub mod networks;
pub mod optim;
pub mod pool;
pub mod trainer;

pub use config::TrainConfig;
pub use trainer::{Progress, StepLosses, Trainer};
