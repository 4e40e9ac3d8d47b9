//! `cycletrain export`: the serving model file (G and F only) from a run's checkpoint.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Tensor};

use super::run::checkpoint_path;
use super::trainer::{checkpoint_generators, CheckpointGenerators};
use crate::model::{Direction, Domains, ModelFile, ModelMetadata};

/// Writes `out` from a run directory or a checkpoint file; `half` stores f16 weights.
pub fn export(source: &Path, out: &Path, domains: Domains, half: bool) -> anyhow::Result<ModelMetadata> {
    let checkpoint = if source.is_dir() { checkpoint_path(source) } else { source.to_path_buf() };
    let CheckpointGenerators { config, progress, g, f } = checkpoint_generators(&checkpoint)?;
    let storage = if half { DType::F16 } else { DType::F32 };
    let convert = |weights: HashMap<String, Tensor>| -> candle_core::Result<HashMap<String, Tensor>> {
        weights.into_iter().map(|(k, v)| Ok((k, v.to_dtype(storage)?))).collect()
    };
    let generators = BTreeMap::from([(Direction::XtoY, convert(g)?), (Direction::YtoX, convert(f)?)]);
    let provenance = [
        ("producer", format!("cycletrain {}", env!("CARGO_PKG_VERSION"))),
        ("dataset", format!("X: {}; Y: {}", config.x_dir.display(), config.y_dir.display())),
        ("epochs", format!("{} of {}", progress.epoch, config.total_epochs())),
        ("steps", progress.global_step.to_string()),
        ("training_seconds", format!("{:.0}", progress.seconds)),
        ("recipe", serde_json::to_string(&config)?),
        ("storage", format!("{storage:?}").to_lowercase()),
        ("created", humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()),
    ];
    let metadata = ModelMetadata {
        architecture: config.generator,
        domains,
        provenance: provenance.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
    };
    ModelFile::save(out, &metadata, &generators)?;
    Ok(metadata)
}
