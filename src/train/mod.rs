//! `cycletrain`: CycleGAN training with the original recipe, on CPU or CUDA.
//!
//! [`trainer`] holds one optimisation step and the run's state; [`run`] drives epochs of
//! batches from [`data`], writing [`durable`] checkpoints, the [`loss_log`], [`samples`] and the
//! loss [`plot`], under a [`lock`], until done or [`interrupt`]ed; [`export`] turns a checkpoint
//! into the model file the server loads, with its [`provenance`].

pub mod cli;
pub mod config;
pub mod data;
pub mod durable;
pub mod eval;
pub mod export;
pub mod interrupt;
pub mod lock;
pub mod loss_log;
pub mod networks;
pub mod optim;
pub mod plot;
pub mod pool;
pub mod progress;
pub mod provenance;
pub mod run;
pub mod samples;
pub mod trainer;

pub use config::TrainConfig;
pub use trainer::{Progress, StepLosses, Trainer};
