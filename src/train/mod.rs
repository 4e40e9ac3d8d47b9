//! `cycletrain`: CycleGAN training with the original recipe, on CPU or CUDA.
//!
//! [`trainer`] holds one optimisation step and the run's state; [`run`] drives epochs of
//! batches from [`data`], writing [`durable`] checkpoints, the [`loss_log`], [`samples`] and the
//! loss [`plot`], under a [`lock`], until done or [`interrupt`]ed; [`export`] turns a checkpoint
//! into the model file the server loads, with its [`provenance`]; a run may keep an [`average`]
//! of its generators to export instead of the last step's.

pub mod average;
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

/// Keeps candle's own elementwise thread pool on the calling thread, unless `CANDLE_NUM_THREADS`
/// says otherwise. A step's heavy ops (convolutions, norms, gathers, Adam) run on rayon's pool;
/// candle's second pool, whose workers spin between ops, competed with it for the cores and
/// cost about a tenth of a step on 2 cores (more on a loaded machine), for the little
/// elementwise work still left to candle (`cargo bench --bench bench -- train`, BENCHMARKS.md).
///
/// Call it first thing in `main`, while the process has a single thread: candle reads the
/// variable once, when its pool starts.
pub fn keep_candle_elementwise_on_one_thread() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}
