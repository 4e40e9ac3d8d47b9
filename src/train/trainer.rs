//! One CycleGAN optimisation step, and the trainer's whole state with its checkpoints.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::average::{AverageConfig, GeneratorAverage};
use super::config::TrainConfig;
use super::networks::Networks;
use super::optim::Adam;
use super::pool::ImagePool;

/// Salt that keeps the pool's random stream apart from the data's and the init's.
const POOL_STREAM: u64 = 0x706f6f6c;

/// Losses of one step, named as the reference trace names them; each is already weighted.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct StepLosses {
    #[serde(rename = "G_total")]
    pub g_total: f64,
    #[serde(rename = "gan_G")]
    pub gan_g: f64,
    #[serde(rename = "gan_F")]
    pub gan_f: f64,
    pub cycle_x: f64,
    pub cycle_y: f64,
    pub identity_x: f64,
    pub identity_y: f64,
    #[serde(rename = "D_X")]
    pub d_x: f64,
    #[serde(rename = "D_Y")]
    pub d_y: f64,
}

/// Where a run stands.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Progress {
    pub epoch: usize,
    /// Steps done in the current epoch.
    pub step_in_epoch: usize,
    pub global_step: u64,
    /// Wall time spent training, summed over resumed runs.
    pub seconds: f64,
}

/// Everything a checkpoint holds besides tensors.
#[derive(Serialize, Deserialize)]
struct CheckpointState {
    trainer: String,
    config: TrainConfig,
    progress: Progress,
    optimizer_steps: OptimizerSteps,
    pool_sizes: PoolSizes,
    /// The pools' random generator, exactly where it stands.
    rng: ChaCha8Rng,
}

/// Updates each optimiser has made (Adam's bias correction depends on them).
#[derive(Serialize, Deserialize)]
struct OptimizerSteps {
    generators: u64,
    discriminators: u64,
}

/// Fakes held by each domain's image pool.
#[derive(Serialize, Deserialize)]
struct PoolSizes {
    x: usize,
    y: usize,
}

pub struct Trainer {
    pub config: TrainConfig,
    pub nets: Networks,
    pub progress: Progress,
    opt_g: Adam,
    opt_d: Adam,
    pool_x: ImagePool,
    pool_y: ImagePool,
    rng: ChaCha8Rng,
    /// Kept exactly when `config.average` is set.
    average: Option<GeneratorAverage>,
    device: Device,
}

impl Trainer {
    /// A fresh run, initialised from the config's seed.
    pub fn new(config: TrainConfig, device: &Device) -> candle_core::Result<Self> {
        let mut trainer = Self::with_networks(config, device)?;
        trainer.nets.init_normal(trainer.config.seed)?;
        trainer.start_configured_average()?;
        Ok(trainer)
    }

    /// A fresh run starting from given weights, named `G.model.1.weight`, `D_X.model.0.bias`…
    pub fn from_weights(
        config: TrainConfig,
        device: &Device,
        weights: &HashMap<String, Tensor>,
    ) -> candle_core::Result<Self> {
        let mut trainer = Self::with_networks(config, device)?;
        trainer.nets.load(weights)?;
        trainer.start_configured_average()?;
        Ok(trainer)
    }

    fn with_networks(config: TrainConfig, device: &Device) -> candle_core::Result<Self> {
        let nets = Networks::new(config.generator, config.discriminator, device)?;
        let opt_g = Adam::new(config.adam, &[("G", &nets.vars[0]), ("F", &nets.vars[1])])?;
        let opt_d = Adam::new(config.adam, &[("D_X", &nets.vars[2]), ("D_Y", &nets.vars[3])])?;
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        rng.set_stream(POOL_STREAM);
        let mut trainer = Self {
            pool_x: ImagePool::new(config.pool_size),
            pool_y: ImagePool::new(config.pool_size),
            config,
            nets,
            progress: Progress::default(),
            opt_g,
            opt_d,
            rng,
            average: None,
            device: device.clone(),
        };
        trainer.apply_schedule();
        Ok(trainer)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Sets both optimisers' learning rate for the current epoch.
    fn apply_schedule(&mut self) {
        let lr = self.config.adam.lr * self.config.lr_factor(self.progress.epoch);
        self.opt_g.set_lr(lr);
        self.opt_d.set_lr(lr);
    }

    /// Replaces the schedule of a resumed run (to shorten or extend it); the epoch it is in
    /// must still be part of the new one.
    pub fn reschedule(&mut self, epochs: usize, epochs_decay: usize) -> anyhow::Result<()> {
        let total = epochs + epochs_decay;
        if self.progress.epoch >= total {
            anyhow::bail!(
                "the run is already in epoch {} (counted from 0); a schedule of {epochs} + {epochs_decay} \
                 epochs ends before it",
                self.progress.epoch
            );
        }
        self.config.epochs = epochs;
        self.config.epochs_decay = epochs_decay;
        self.apply_schedule();
        Ok(())
    }

    /// An average the config asks for starts at the weights the run starts from.
    fn start_configured_average(&mut self) -> candle_core::Result<()> {
        self.average = match self.config.average {
            Some(config) => Some(GeneratorAverage::start(config, &self.nets)?),
            None => None,
        };
        Ok(())
    }

    /// Starts the moving average of G and F at their current weights, from the current step on.
    /// A run that already keeps one keeps it, if it uses the same decay.
    pub fn start_average(&mut self, decay: f64) -> anyhow::Result<()> {
        if let Some(kept) = self.config.average {
            if kept.decay != decay {
                anyhow::bail!(
                    "the run has averaged its generators with decay {} since step {}; it cannot \
                     change to {decay}",
                    kept.decay,
                    kept.since_step
                );
            }
            return Ok(());
        }
        let config = AverageConfig::new(decay, self.progress.global_step)?;
        tracing::info!(decay, from_step = config.since_step, "keeping a moving average of G and F");
        self.average = Some(GeneratorAverage::start(config, &self.nets)?);
        self.config.average = Some(config);
        Ok(())
    }

    pub fn lr(&self) -> f64 {
        self.opt_g.lr()
    }

    /// One step of the recipe on NCHW batches in [-1, 1]: update G and F on their losses, then
    /// D_X and D_Y on real images and pooled fakes made before that update.
    pub fn step(&mut self, real_x: &Tensor, real_y: &Tensor) -> candle_core::Result<StepLosses> {
        let g = self.nets.generator_losses(real_x, real_y, self.config.loss_weights())?;
        self.opt_g.step(&g.total.backward()?)?;
        if let Some(average) = &mut self.average {
            average.update(&self.nets)?;
        }

        let fake_x = self.pool_x.query(&g.fake_x, &mut self.rng)?;
        let fake_y = self.pool_y.query(&g.fake_y, &mut self.rng)?;
        let (d_x, d_y) = self.nets.discriminator_losses(real_x, real_y, &fake_x, &fake_y)?;
        self.opt_d.step(&(&d_x + &d_y)?.backward()?)?;

        self.progress.step_in_epoch += 1;
        self.progress.global_step += 1;
        let value = |t: &Tensor| -> candle_core::Result<f64> { t.to_dtype(DType::F64)?.to_scalar::<f64>() };
        Ok(StepLosses {
            g_total: value(&g.total)?,
            gan_g: value(&g.gan_g)?,
            gan_f: value(&g.gan_f)?,
            cycle_x: value(&g.cycle_x)?,
            cycle_y: value(&g.cycle_y)?,
            identity_x: value(&g.identity_x)?,
            identity_y: value(&g.identity_y)?,
            d_x: value(&d_x)?,
            d_y: value(&d_y)?,
        })
    }

    /// Moves on to the next epoch and its learning rate.
    pub fn finish_epoch(&mut self) {
        self.progress.epoch += 1;
        self.progress.step_in_epoch = 0;
        self.apply_schedule();
    }

    /// Networks, optimiser moments, pools, progress, RNG state and config as the bytes of one
    /// safetensors file.
    pub fn checkpoint_bytes(&self) -> anyhow::Result<Vec<u8>> {
        let mut tensors: Vec<(String, Tensor)> =
            self.nets.sorted_vars().into_iter().map(|(n, v)| (n, v.as_tensor().detach())).collect();
        for (prefix, opt) in [("opt_g", &self.opt_g), ("opt_d", &self.opt_d)] {
            tensors.extend(opt.state().into_iter().map(|(n, t)| (format!("{prefix}.{n}"), t)));
        }
        for (prefix, pool) in [("pool_x", &self.pool_x), ("pool_y", &self.pool_y)] {
            tensors
                .extend(pool.images().iter().enumerate().map(|(i, t)| (format!("{prefix}.{i}"), t.clone())));
        }
        if let Some(average) = &self.average {
            tensors.extend(average.checkpoint_tensors());
        }
        let state = CheckpointState {
            trainer: format!("cycletrain {}", env!("CARGO_PKG_VERSION")),
            config: self.config.clone(),
            progress: self.progress,
            optimizer_steps: OptimizerSteps {
                generators: self.opt_g.steps(),
                discriminators: self.opt_d.steps(),
            },
            pool_sizes: PoolSizes { x: self.pool_x.images().len(), y: self.pool_y.images().len() },
            rng: self.rng.clone(),
        };
        let metadata = HashMap::from([("cycletrain".to_string(), serde_json::to_string(&state)?)]);
        let tensors = tensors.into_iter().map(|(n, t)| Ok((n, t.to_device(&Device::Cpu)?.contiguous()?)));
        let tensors = tensors.collect::<candle_core::Result<Vec<_>>>()?;
        Ok(safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))?)
    }

    /// Restores a run exactly as [`Trainer::checkpoint_bytes`] left it.
    pub fn resume(path: &Path, device: &Device) -> anyhow::Result<Self> {
        let Checkpoint { tensors, state } = Checkpoint::read(path)?;
        let mut trainer = Self::from_weights(state.config.clone(), device, &tensors)?;
        let get = |name: String| -> candle_core::Result<Tensor> {
            match tensors.get(&name) {
                Some(t) => t.to_device(device),
                None => candle_core::bail!("checkpoint lacks {name}"),
            }
        };
        trainer.opt_g.load_state(state.optimizer_steps.generators, |n| get(format!("opt_g.{n}")))?;
        trainer.opt_d.load_state(state.optimizer_steps.discriminators, |n| get(format!("opt_d.{n}")))?;
        for (pool, prefix, size) in [
            (&mut trainer.pool_x, "pool_x", state.pool_sizes.x),
            (&mut trainer.pool_y, "pool_y", state.pool_sizes.y),
        ] {
            pool.restore(
                (0..size).map(|i| get(format!("{prefix}.{i}"))).collect::<candle_core::Result<_>>()?,
            );
        }
        if let Some(config) = state.config.average {
            trainer.average = Some(GeneratorAverage::restore(config, &trainer.nets, &tensors)?);
        }
        trainer.rng = state.rng;
        trainer.progress = state.progress;
        trainer.apply_schedule();
        Ok(trainer)
    }
}

/// A checkpoint file as read: tensors on the CPU, and the state beside them.
struct Checkpoint {
    tensors: HashMap<String, Tensor>,
    state: CheckpointState,
}

impl Checkpoint {
    fn read(path: &Path) -> anyhow::Result<Self> {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read checkpoint {}", path.display()))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .with_context(|| format!("{} is not a cycletrain checkpoint", path.display()))?;
        let state_json = header.metadata().as_ref().and_then(|m| m.get("cycletrain")).with_context(|| {
            format!("{} is not a cycletrain checkpoint (no training state)", path.display())
        })?;
        let state: CheckpointState = serde_json::from_str(state_json).with_context(|| {
            format!(
                "cannot read the training state of {} (checkpoints written before the state's \
                 named fields, November 2026, cannot be resumed by this version)",
                path.display()
            )
        })?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
        Ok(Self { tensors, state })
    }
}

/// What export needs of a checkpoint.
pub struct CheckpointGenerators {
    pub config: TrainConfig,
    pub progress: Progress,
    /// Which weights `g` and `f` are.
    pub weights: GeneratorWeights,
    /// X→Y weights, by PyTorch name.
    pub g: HashMap<String, Tensor>,
    /// Y→X weights.
    pub f: HashMap<String, Tensor>,
}

/// Which weights of a checkpoint to take.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GeneratorWeights {
    /// The generators as the last step left them.
    Last,
    /// Their moving average (a run with `--average-decay`).
    Average,
}

/// The config, progress and G/F weights of a checkpoint: the average's when `weights` asks for
/// it (which the run must then keep) or, by default, when the run keeps one.
pub fn checkpoint_generators(
    path: &Path,
    weights: Option<GeneratorWeights>,
) -> anyhow::Result<CheckpointGenerators> {
    let Checkpoint { tensors, state } = Checkpoint::read(path)?;
    let weights = weights.unwrap_or(match state.config.average {
        Some(_) => GeneratorWeights::Average,
        None => GeneratorWeights::Last,
    });
    let prefix = match weights {
        GeneratorWeights::Last => "",
        GeneratorWeights::Average if state.config.average.is_some() => super::average::AVERAGE_PREFIX,
        GeneratorWeights::Average => anyhow::bail!(
            "{} keeps no average of its generators (a run keeps one with --average-decay)",
            path.display()
        ),
    };
    let strip = |network: &str| -> HashMap<String, Tensor> {
        let network = format!("{prefix}{network}.");
        tensors.iter().filter_map(|(k, v)| Some((k.strip_prefix(&network)?.to_string(), v.clone()))).collect()
    };
    Ok(CheckpointGenerators {
        config: state.config,
        progress: state.progress,
        weights,
        g: strip("G"),
        f: strip("F"),
    })
}
