//! What a training run is: data, architecture and recipe, saved in every checkpoint.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::average::AverageConfig;
use super::networks::LossWeights;
use super::optim::AdamConfig;
use crate::model::{DiscriminatorConfig, GeneratorConfig};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Images of domain X (`trainA` of the CycleGAN datasets).
    pub x_dir: PathBuf,
    /// Images of domain Y (`trainB`).
    pub y_dir: PathBuf,
    /// How exported models name the data: `--dataset-name`, or the two folders relative to the
    /// run directory; never an absolute path (see [`super::provenance`]). Absent in checkpoints
    /// of older versions.
    #[serde(default)]
    pub dataset: Option<String>,
    pub generator: GeneratorConfig,
    pub discriminator: DiscriminatorConfig,
    /// Images are resized to `load_size`² before a random `crop_size`² crop.
    pub load_size: u32,
    pub crop_size: u32,
    /// Random horizontal flips.
    pub flip: bool,
    pub batch_size: usize,
    /// Epochs at the initial learning rate.
    pub epochs: usize,
    /// Epochs over which the learning rate then decays linearly to 0.
    pub epochs_decay: usize,
    /// The generators' and the discriminators' optimiser (one each).
    pub adam: AdamConfig,
    pub lambda_cycle: f64,
    /// Identity loss weight, as a fraction of `lambda_cycle`.
    pub lambda_identity: f64,
    /// Capacity of each domain's image pool of past fakes.
    pub pool_size: usize,
    pub seed: u64,
    /// The model file G and F started from (`--init-generators`), instead of the seed's random
    /// weights. Absent for runs that started from the seed, and in checkpoints of older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_generators: Option<GeneratorInit>,
    /// The moving average of G and F the run keeps (`--average-decay`), if any. It may start on a
    /// resume, so `since_step` says from where. Absent in checkpoints of older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub average: Option<AverageConfig>,
}

/// A model file that a run's generators started from, named as provenance names data: by file
/// name and content, never by its path on the training machine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GeneratorInit {
    pub file: String,
    pub sha256: String,
    /// The training steps its header records (`None` for a file that does not say).
    pub steps: Option<u64>,
}

impl TrainConfig {
    pub fn total_epochs(&self) -> usize {
        self.epochs + self.epochs_decay
    }

    /// The original CycleGAN schedule: 1 for the first `epochs` epochs (counted from 0), then
    /// down by `1 / (epochs_decay + 1)` per epoch.
    pub fn lr_factor(&self, epoch: usize) -> f64 {
        let decayed = (epoch + 1).saturating_sub(self.epochs) as f64;
        (1.0 - decayed / (self.epochs_decay as f64 + 1.0)).max(0.0)
    }

    pub fn loss_weights(&self) -> LossWeights {
        LossWeights { cycle: self.lambda_cycle, identity: self.lambda_identity }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Family;

    #[test]
    fn learning_rate_is_constant_then_decays_linearly() {
        let config = TrainConfig {
            x_dir: "a".into(),
            y_dir: "b".into(),
            dataset: None,
            generator: GeneratorConfig::published(Family::Upsample),
            discriminator: DiscriminatorConfig { ndf: 64 },
            load_size: 286,
            crop_size: 256,
            flip: true,
            batch_size: 1,
            epochs: 3,
            epochs_decay: 3,
            adam: AdamConfig { lr: 2e-4, beta1: 0.5, beta2: 0.999, eps: 1e-8 },
            lambda_cycle: 10.,
            lambda_identity: 0.5,
            pool_size: 50,
            seed: 0,
            init_generators: None,
            average: None,
        };
        let factors: Vec<f64> = (0..6).map(|e| config.lr_factor(e)).collect();
        assert_eq!(factors, vec![1.0, 1.0, 1.0, 0.75, 0.5, 0.25]);
        assert_eq!(config.lr_factor(6), 0.0);
    }
}
