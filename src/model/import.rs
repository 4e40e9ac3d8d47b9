//! Importing PyTorch generator checkpoints (`.pth`, zip format) into our model file.
//!
//! Both reference code bases save a bare `state_dict`; some tools wrap it in a dict under
//! `state_dict`. The architecture is not stored in either, so it is inferred from key names and
//! shapes and then every key is checked against what that architecture needs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use candle_core::pickle::PthTensors;
use candle_core::{DType, Tensor};

use super::config::{Family, GeneratorConfig, ParamSpec};
use super::file::{check_parameters, describe, Direction, Domains, ModelFile, ModelMetadata};
use super::ModelError;

/// Buffers that PyTorch 0.3-era InstanceNorm layers saved; they are never used by instance norm
/// without running statistics, which is what both code bases run.
const IGNORED_SUFFIXES: [&str; 3] = [".running_mean", ".running_var", ".num_batches_tracked"];

/// One generator read from a checkpoint, with the architecture its keys imply.
#[derive(Debug)]
pub struct ImportedGenerator {
    pub config: GeneratorConfig,
    pub weights: HashMap<String, Tensor>,
}

/// Reads a `.pth` generator checkpoint and maps it onto our architecture.
pub fn read_checkpoint(path: &Path) -> Result<ImportedGenerator, ModelError> {
    let fail = |reason: String| ModelError::Import { path: path.to_path_buf(), reason };
    let open = |key| {
        PthTensors::new(path, key).map_err(|e| match std::fs::metadata(path) {
            Err(io) => fail(io.to_string()),
            Ok(_) => fail(format!(
                "not a zip-format PyTorch checkpoint ({e}); re-save it with torch.save from PyTorch 1.6 or later"
            )),
        })
    };
    let mut pth = open(None)?;
    if pth.tensor_infos().is_empty() {
        pth = open(Some("state_dict"))?;
    }
    if pth.tensor_infos().is_empty() {
        return Err(fail(
            "no tensors found: expected a state_dict, or a dict holding one under `state_dict`".into(),
        ));
    }

    let mut weights = HashMap::new();
    for name in pth.tensor_infos().keys() {
        if IGNORED_SUFFIXES.iter().any(|s| name.ends_with(s)) {
            continue;
        }
        let tensor = pth
            .get(name)
            .map_err(|e| fail(format!("cannot read tensor {name}: {e}")))?
            .ok_or_else(|| fail(format!("cannot read tensor {name}")))?;
        // Checkpoints saved from nn.DataParallel carry a `module.` prefix.
        let key = name.strip_prefix("module.").unwrap_or(name).to_string();
        weights.insert(key, tensor.to_dtype(DType::F32)?);
    }
    let specs: Vec<ParamSpec> = weights.iter().map(|(n, t)| (n.clone(), t.dims().to_vec())).collect();
    let config = infer_config(&specs).map_err(fail)?;
    let problems = check_parameters(&config, &specs, "");
    if !problems.is_empty() {
        return Err(fail(format!(
            "its keys do not fit the generator they suggest ({}): {}",
            describe(&config),
            problems.join("; ")
        )));
    }
    Ok(ImportedGenerator { config, weights })
}

/// Infers family, ngf, block count and norm affinity from PyTorch key names and shapes.
pub fn infer_config(params: &[ParamSpec]) -> Result<GeneratorConfig, String> {
    let shape = |key: &str| params.iter().find(|(n, _)| n == key).map(|(_, s)| s.as_slice());
    let ngf = match shape("model.1.weight") {
        Some([ngf, 3, 7, 7]) => *ngf,
        Some(other) => {
            return Err(format!(
                "model.1.weight is {other:?}, expected [ngf, 3, 7, 7]: not a CycleGAN ResNet generator for RGB images"
            ))
        }
        None => {
            let keys: Vec<&str> = params.iter().take(5).map(|(n, _)| n.as_str()).collect();
            return Err(format!(
                "no model.1.weight: not a CycleGAN ResNet generator (first keys: {})",
                keys.join(", ")
            ));
        }
    };
    let mut blocks: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (name, _) in params {
        let parts: Vec<&str> = name.split('.').collect();
        if let ["model", index, block @ ("block" | "conv_block"), ..] = parts.as_slice() {
            blocks.entry(*block).or_default().insert(*index);
        }
    }
    let (family, n_blocks) = match (blocks.get("block"), blocks.get("conv_block")) {
        (Some(_), Some(_)) => {
            return Err("keys name residual blocks both `block` (upsample family) and `conv_block` \
                        (transpose family)"
                .into())
        }
        (Some(b), None) => (Family::Upsample, b.len()),
        (None, Some(b)) => (Family::Transpose, b.len()),
        // No residual blocks: a transposed conv sits right after the bottleneck at index 10.
        (None, None) if shape("model.10.weight").is_some() => (Family::Transpose, 0),
        (None, None) => (Family::Upsample, 0),
    };
    Ok(GeneratorConfig { family, ngf, n_blocks, norm_affine: shape("model.2.weight").is_some() })
}

/// What `cycleserve import` did.
#[derive(Debug)]
pub struct ImportReport {
    pub metadata: ModelMetadata,
    pub directions: Vec<Direction>,
}

/// Imports one or two generator checkpoints into a model file at `out`.
pub fn import(
    x2y: &Path,
    y2x: Option<&Path>,
    domains: Domains,
    out: &Path,
) -> Result<ImportReport, ModelError> {
    let mut sources = vec![(Direction::XtoY, x2y)];
    sources.extend(y2x.map(|p| (Direction::YtoX, p)));
    let mut generators = BTreeMap::new();
    let mut config: Option<GeneratorConfig> = None;
    for (direction, path) in &sources {
        let imported = read_checkpoint(path)?;
        if let Some(first) = config.filter(|c| *c != imported.config) {
            return Err(ModelError::Import {
                path: path.to_path_buf(),
                reason: format!(
                    "its architecture ({}) differs from the x2y checkpoint's ({}); one model file holds one architecture",
                    describe(&imported.config),
                    describe(&first)
                ),
            });
        }
        config = Some(imported.config);
        generators.insert(*direction, imported.weights);
    }
    let source = sources
        .iter()
        .map(|(d, p)| format!("{d}: {}", p.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()))
        .collect::<Vec<_>>()
        .join("; ");
    let metadata = ModelMetadata {
        architecture: config.expect("at least the x2y checkpoint was read"),
        domains,
        provenance: BTreeMap::from([
            ("producer".to_string(), format!("cycleserve import {}", env!("CARGO_PKG_VERSION"))),
            ("source".to_string(), source),
            (
                "created".to_string(),
                humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            ),
        ]),
    };
    ModelFile::save(out, &metadata, &generators)?;
    Ok(ImportReport { metadata, directions: generators.keys().copied().collect() })
}
