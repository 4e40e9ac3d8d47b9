//! The training loop: epochs of prefetched batches, checkpoints, samples, logs and the plot.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use candle_core::{Module, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use super::data::{Dataset, Loader};
use super::eval::EvalSet;
use super::plot::plot_losses;
use super::samples::SampleSet;
use super::trainer::{Progress, StepLosses, Trainer};

pub const CHECKPOINT: &str = "checkpoint.safetensors";
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
    /// Held-out images evaluated every `eval_every` steps into `eval.jsonl`.
    pub eval: Option<(EvalSet, u64)>,
}

/// One line of `losses.jsonl`.
#[derive(Serialize, Deserialize)]
struct LossRecord {
    step: u64,
    epoch: usize,
    lr: f64,
    seconds: f64,
    #[serde(flatten)]
    losses: StepLosses,
}

pub fn checkpoint_path(run_dir: &Path) -> PathBuf {
    run_dir.join(CHECKPOINT)
}

/// Trains until the schedule ends or `max_steps` is reached; checkpoints on the way.
pub fn run(mut trainer: Trainer, dataset: Arc<Dataset>, options: &RunOptions) -> anyhow::Result<()> {
    let out = &options.out_dir;
    std::fs::create_dir_all(out.join("samples"))
        .with_context(|| format!("cannot create {}", out.display()))?;
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&trainer.config)?)?;
    let log_path = out.join(LOSSES);
    // A run killed after its last checkpoint logged steps that its resumption will redo.
    truncate_log(&log_path, trainer.progress.global_step)?;
    let mut log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;

    let config = trainer.config.clone();
    let crop = config.crop_size as usize;
    let samples = SampleSet::new(&dataset, SAMPLE_COUNT, config.crop_size, trainer.device())?;
    let steps_per_epoch = dataset.steps_per_epoch(config.batch_size);
    let schedule_steps = (config.total_epochs() * steps_per_epoch) as u64;
    let last_step = options.max_steps.map_or(schedule_steps, |m| m.min(schedule_steps));
    let bar = progress_bar(last_step, trainer.progress.global_step);
    let (started, seconds_before) = (Instant::now(), trainer.progress.seconds);
    tracing::info!(
        x = dataset.x_files().len(),
        y = dataset.y_files().len(),
        steps_per_epoch,
        from_step = trainer.progress.global_step,
        to_step = last_step,
        "training"
    );

    // Reaching the last step ends the run at once, unless that step completed its epoch: then the
    // epoch is finished first, so the checkpoint counts it (also for a run saved before this rule).
    let stop_mid_epoch = |p: &Progress| p.global_step >= last_step && p.step_in_epoch < steps_per_epoch;
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
            writeln!(log, "{}", serde_json::to_string(&record)?)?;
            bar.set_position(step);
            bar.set_message(format!(
                "epoch {}/{} G {:.3} cyc {:.3}/{:.3} D {:.3}/{:.3}",
                epoch + 1,
                config.total_epochs(),
                record.losses.g_total,
                record.losses.cycle_x,
                record.losses.cycle_y,
                record.losses.d_x,
                record.losses.d_y
            ));
            if step % options.sample_every == 0 {
                samples.write_grid(&trainer.nets, &out.join(format!("samples/step_{step:07}.png")))?;
            }
            if let Some((set, every)) = &options.eval {
                if step % every == 0 {
                    evaluate(&trainer, set, out)?;
                }
            }
            if step % options.save_every == 0 {
                log.flush()?;
                trainer.save(&checkpoint_path(out))?;
            }
            if stop_mid_epoch(&trainer.progress) {
                break 'epochs;
            }
        }
        trainer.finish_epoch();
        trainer.save(&checkpoint_path(out))?;
    }
    bar.finish();
    log.flush()?;
    trainer.save(&checkpoint_path(out))?;
    let step = trainer.progress.global_step;
    samples.write_grid(&trainer.nets, &out.join(format!("samples/step_{step:07}.png")))?;
    if let Some((set, every)) = &options.eval {
        if step % every != 0 {
            evaluate(&trainer, set, out)?;
        }
    }
    plot_losses(&read_log(&log_path)?, &out.join(LOSS_PLOT))?;
    tracing::info!(step, seconds = trainer.progress.seconds, dir = %out.display(), "training stopped");
    Ok(())
}

/// Appends one held-out evaluation to `eval.jsonl`.
fn evaluate(trainer: &Trainer, set: &EvalSet, out: &Path) -> anyhow::Result<()> {
    let g = |x: &Tensor| trainer.nets.g.forward(x);
    let f = |x: &Tensor| trainer.nets.f.forward(x);
    let report = set.evaluate(&g, &f, trainer.progress.global_step)?;
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(out.join(EVALUATIONS))?;
    writeln!(file, "{}", serde_json::to_string(&report)?)?;
    tracing::info!(?report, "held-out evaluation");
    Ok(())
}

fn progress_bar(total: u64, done: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {per_sec} ETA {eta} {msg}")
            .expect("valid progress template")
            .progress_chars("=> "),
    );
    bar.set_position(done);
    bar.reset_eta();
    bar
}

/// Every logged step with its losses.
pub fn read_log(path: &Path) -> anyhow::Result<Vec<(u64, StepLosses)>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut records = Vec::new();
    for line in std::io::BufReader::new(file).lines() {
        let record: LossRecord = serde_json::from_str(&line?)?;
        records.push((record.step, record.losses));
    }
    Ok(records)
}

fn truncate_log(path: &Path, keep_through: u64) -> anyhow::Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| serde_json::from_str::<LossRecord>(l).is_ok_and(|r| r.step <= keep_through))
        .collect();
    let mut body = kept.join("\n");
    if !body.is_empty() {
        body.push('\n');
    }
    std::fs::write(path, body)?;
    Ok(())
}
