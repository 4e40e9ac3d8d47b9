//! `cycletrain export`: the serving model file (G and F only) from a run's checkpoint.

use std::collections::BTreeMap;
use std::path::Path;

use super::provenance::dataset_label;
use super::run::checkpoint_path;
use super::trainer::{checkpoint_generators, CheckpointGenerators, GeneratorWeights};
use super::TrainConfig;
use crate::model::{Direction, Domains, ModelFile, ModelMetadata, WeightStorage};

/// What to export besides the checkpoint and the domain names.
pub struct ExportOptions {
    pub storage: WeightStorage,
    /// The generators' weights to take [default: the run's average if it keeps one, else the
    /// last step's].
    pub weights: Option<GeneratorWeights>,
    /// Replaces the name the run recorded for its data.
    pub dataset_name: Option<String>,
}

/// Writes `out` from a run directory or a checkpoint file.
pub fn export(
    source: &Path,
    out: &Path,
    domains: Domains,
    options: ExportOptions,
) -> anyhow::Result<ModelMetadata> {
    let checkpoint = if source.is_dir() { checkpoint_path(source) } else { source.to_path_buf() };
    let CheckpointGenerators { config, progress, weights, g, f } =
        checkpoint_generators(&checkpoint, options.weights)?;
    let generators = BTreeMap::from([(Direction::XtoY, g), (Direction::YtoX, f)]);
    let dataset = options.dataset_name.or_else(|| config.dataset.clone()).unwrap_or_else(|| {
        // A checkpoint from before runs named their data: name it from the run's folder now.
        let run_dir = checkpoint.parent().unwrap_or(Path::new("."));
        dataset_label(&config.x_dir, &config.y_dir, run_dir)
    });
    let provenance = [
        ("producer", format!("cycletrain {}", env!("CARGO_PKG_VERSION"))),
        ("dataset", dataset),
        ("epochs", format!("{} of {}", progress.epoch, config.total_epochs())),
        ("steps", progress.global_step.to_string()),
        ("training_seconds", format!("{:.0}", progress.seconds)),
        ("weights", weights_description(weights, &config)),
        ("recipe", recipe(&config)?),
        ("created", humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()),
    ];
    let metadata = ModelMetadata {
        architecture: config.generator,
        domains,
        provenance: provenance.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
    };
    ModelFile::save(out, &metadata, &generators, options.storage)?;
    Ok(metadata)
}

/// Which generator weights the file holds, in words: `last step`, or `moving average (decay
/// 0.999, from step 2508)`.
fn weights_description(weights: GeneratorWeights, config: &TrainConfig) -> String {
    match (weights, config.average) {
        (GeneratorWeights::Average, Some(average)) => {
            format!("moving average (decay {}, from step {})", average.decay, average.since_step)
        }
        _ => "last step".to_string(),
    }
}

/// The config as JSON without where the data lay on the training machine (`dataset` says
/// what it was).
fn recipe(config: &TrainConfig) -> serde_json::Result<String> {
    let mut recipe = serde_json::to_value(config)?;
    if let Some(fields) = recipe.as_object_mut() {
        for local in ["x_dir", "y_dir", "dataset"] {
            fields.remove(local);
        }
    }
    serde_json::to_string(&recipe)
}
