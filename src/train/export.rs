//! `cycletrain export`: the serving model file (G and F only) from a run's checkpoint.

use std::collections::BTreeMap;
use std::path::Path;

use super::provenance::dataset_label;
use super::run::checkpoint_path;
use super::trainer::{checkpoint_generators, CheckpointGenerators};
use super::TrainConfig;
use crate::model::{Direction, Domains, ModelFile, ModelMetadata, WeightStorage};

/// Writes `out` from a run directory or a checkpoint file, its weights in `storage`.
/// `dataset_name` replaces the name the run recorded for its data.
pub fn export(
    source: &Path,
    out: &Path,
    domains: Domains,
    storage: WeightStorage,
    dataset_name: Option<String>,
) -> anyhow::Result<ModelMetadata> {
    let checkpoint = if source.is_dir() { checkpoint_path(source) } else { source.to_path_buf() };
    let CheckpointGenerators { config, progress, g, f } = checkpoint_generators(&checkpoint)?;
    let generators = BTreeMap::from([(Direction::XtoY, g), (Direction::YtoX, f)]);
    let dataset = dataset_name.or_else(|| config.dataset.clone()).unwrap_or_else(|| {
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
        ("recipe", recipe(&config)?),
        ("created", humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()),
    ];
    let metadata = ModelMetadata {
        architecture: config.generator,
        domains,
        provenance: provenance.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
    };
    ModelFile::save(out, &metadata, &generators, storage)?;
    Ok(metadata)
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
