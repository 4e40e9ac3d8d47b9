//! The training loop: epochs of prefetched batches, checkpoints, samples, logs and the plot.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use candle_core::{Module, Tensor};

use super::data::{Dataset, Loader};
use super::durable::{write_durably, write_durably_keeping_previous};
use super::eval::EvalSet;
use super::interrupt::StopRequest;
use super::loss_log::{read_log, LossLog, LossRecord};
use super::plot::plot_losses;
use super::progress::ProgressReport;
use super::samples::SampleSet;
use super::trainer::{Progress, Trainer};
use crate::logging::ProgressOutput;

pub const CHECKPOINT: &str = "checkpoint.safetensors";
/// The checkpoint before the last one, kept until the next save has made the last one durable.
pub const PREVIOUS_CHECKPOINT: &str = "checkpoint.prev.safetensors";
pub const LOSSES: &str = "losses.jsonl";
pub const LOSS_PLOT: &str = "losses.png";
pub const EVALUATIONS: &str = "eval.jsonl";
/// Rows of each sample grid.
const SAMPLE_COUNT: usize = 4;

/// How a run is driven, as opposed to what it trains (that is the [`super::TrainConfig`]).
pub struct RunOptions {
    pub out_dir: PathBuf,
    pub save_every: u64,
    pub sample_every: u64,
    /// Stop (with a checkpoint) once this many steps are done in total.
    pub max_steps: Option<u64>,
    pub workers: usize,
    pub eval: Option<HeldOutEval>,
    /// Once requested, the run stops after the current step, with a checkpoint.
    pub stop: StopRequest,
    pub progress: ProgressOutput,
}

/// Held-out images evaluated every `every` steps (and at the end) into `eval.jsonl`.
pub struct HeldOutEval {
    pub set: EvalSet,
    pub every: u64,
}

pub fn checkpoint_path(run_dir: &Path) -> PathBuf {
    run_dir.join(CHECKPOINT)
}

/// Trains until the schedule ends, `max_steps` is reached or a stop is requested; checkpoints
/// on the way.
pub fn run(mut trainer: Trainer, dataset: Arc<Dataset>, options: &RunOptions) -> anyhow::Result<()> {
    let out = &options.out_dir;
    std::fs::create_dir_all(out.join("samples"))
        .with_context(|| format!("cannot create {}", out.display()))?;
    write_durably(&out.join("config.json"), serde_json::to_string_pretty(&trainer.config)?.as_bytes())?;
    let log_path = out.join(LOSSES);
    // A run killed after its last checkpoint logged steps that its resumption will redo.
    let mut log = LossLog::open(&log_path, trainer.progress.global_step)?;

    let config = trainer.config.clone();
    let crop = config.crop_size as usize;
    let samples = SampleSet::new(&dataset, SAMPLE_COUNT, config.crop_size, trainer.device())?;
    let steps_per_epoch = dataset.steps_per_epoch(config.batch_size);
    let schedule_steps = (config.total_epochs() * steps_per_epoch) as u64;
    let last_step = options.max_steps.map_or(schedule_steps, |m| m.min(schedule_steps));
    let (started, seconds_before) = (Instant::now(), trainer.progress.seconds);
    tracing::info!(
        x = dataset.x_files().len(),
        y = dataset.y_files().len(),
        steps_per_epoch,
        from_step = trainer.progress.global_step,
        to_step = last_step,
        "training"
    );
    let mut progress = ProgressReport::start(
        options.progress,
        trainer.progress.global_step,
        last_step,
        config.total_epochs(),
    );

    // Reaching the last step ends the run at once, unless that step completed its epoch: then the
    // epoch is finished first, so the checkpoint counts it (also for a run saved before this rule).
    let stop_mid_epoch = |p: &Progress| p.global_step >= last_step && p.step_in_epoch < steps_per_epoch;
    let mut checkpoints = Checkpoints::new(out);
    let mut interrupted = false;
    'epochs: while trainer.progress.epoch < config.total_epochs() && !stop_mid_epoch(&trainer.progress) {
        let epoch = trainer.progress.epoch;
        let loader = Loader::start(
            Arc::clone(&dataset),
            epoch,
            trainer.progress.step_in_epoch,
            steps_per_epoch,
            config.batch_size,
            options.workers,
        );
        for batch in loader {
            let batch = batch?;
            let shape = (batch.size, 3, crop, crop);
            let x = Tensor::from_vec(batch.x, shape, trainer.device())?;
            let y = Tensor::from_vec(batch.y, shape, trainer.device())?;
            let losses = trainer.step(&x, &y)?;
            trainer.progress.seconds = seconds_before + started.elapsed().as_secs_f64();
            let step = trainer.progress.global_step;
            let record =
                LossRecord { step, epoch, lr: trainer.lr(), seconds: trainer.progress.seconds, losses };
            log.append(&record)?;
            progress.update(&record);
            if step % options.sample_every == 0 {
                samples.write_grid(&trainer.nets, &out.join(format!("samples/step_{step:07}.png")))?;
            }
            if let Some(eval) = &options.eval {
                if step % eval.every == 0 {
                    evaluate(&trainer, &eval.set, out)?;
                }
            }
            if step % options.save_every == 0 {
                checkpoints.save(&trainer, &log)?;
            }
            // Checked once the step's outputs are all written, so a resumed run redoes none.
            interrupted = options.stop.is_requested();
            if interrupted || stop_mid_epoch(&trainer.progress) {
                break 'epochs;
            }
        }
        trainer.finish_epoch();
        checkpoints.save(&trainer, &log)?;
    }
    drop(progress);
    checkpoints.save(&trainer, &log)?;
    let step = trainer.progress.global_step;
    if interrupted {
        tracing::warn!(step, dir = %out.display(), "stopped by a signal; --resume continues from here");
    } else {
        samples.write_grid(&trainer.nets, &out.join(format!("samples/step_{step:07}.png")))?;
        if let Some(eval) = &options.eval {
            if step % eval.every != 0 {
                evaluate(&trainer, &eval.set, out)?;
            }
        }
    }
    plot_losses(&read_log(&log_path)?, &out.join(LOSS_PLOT))?;
    tracing::info!(step, seconds = trainer.progress.seconds, dir = %out.display(), "training stopped");
    Ok(())
}

/// Saves the run's checkpoint, each state once.
struct Checkpoints {
    path: PathBuf,
    previous: PathBuf,
    saved: Option<Progress>,
}

impl Checkpoints {
    fn new(run_dir: &Path) -> Self {
        Self { path: checkpoint_path(run_dir), previous: run_dir.join(PREVIOUS_CHECKPOINT), saved: None }
    }

    /// Makes the log durable through the current step, then writes the checkpoint durably, the
    /// one it replaces kept as [`PREVIOUS_CHECKPOINT`].
    fn save(&mut self, trainer: &Trainer, log: &LossLog) -> anyhow::Result<()> {
        if self.saved == Some(trainer.progress) {
            return Ok(());
        }
        log.sync()?;
        write_durably_keeping_previous(&self.path, &self.previous, &trainer.checkpoint_bytes()?)
            .with_context(|| format!("cannot write checkpoint {}", self.path.display()))?;
        self.saved = Some(trainer.progress);
        Ok(())
    }
}

/// Appends one held-out evaluation to `eval.jsonl`.
fn evaluate(trainer: &Trainer, set: &EvalSet, out: &Path) -> anyhow::Result<()> {
    use std::io::Write;
    let g = |x: &Tensor| trainer.nets.g.forward(x);
    let f = |x: &Tensor| trainer.nets.f.forward(x);
    let report = set.evaluate(&g, &f, trainer.progress.global_step)?;
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(out.join(EVALUATIONS))?;
    writeln!(file, "{}", serde_json::to_string(&report)?)?;
    tracing::info!(?report, "held-out evaluation");
    Ok(())
}
