//! `cycletrain`: CycleGAN training with the original recipe, on CPU or CUDA.
//!
//! [`trainer`] holds one optimisation step and the run's state; [`run`] drives epochs of
//! batches from [`data`], writing checkpoints, [`samples`] and the loss [`plot`]; [`export`]
//! turns a checkpoint into the model file the server loads.

pub mod cli;
pub mod config;
pub mod data;
pub mod eval;
pub mod export;
pub mod networks;
pub mod optim;
pub mod plot;
pub mod pool;
pub mod run;
pub mod samples;
pub mod trainer;

pub use config::TrainConfig;
pub use trainer::{Progress, StepLosses, Trainer};
