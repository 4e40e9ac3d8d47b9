//! The models an engine serves: found in a folder, checked, described.

use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::EngineError;
use crate::model::{Direction, ModelError, ModelFile, ModelMetadata};

/// What `/v1/models` says about a model.
#[derive(Clone, Debug, Serialize)]
pub struct ModelInfo {
    /// The file name without `.safetensors`; what `?model=` refers to.
    pub name: String,
    #[serde(skip)]
    pub path: PathBuf,
    /// SHA-256 of the model file, hex.
    pub sha256: String,
    pub size_bytes: u64,
    pub directions: Vec<Direction>,
    pub parameters_per_generator: usize,
    pub metadata: ModelMetadata,
}

impl ModelInfo {
    /// Directions by name: `x2y` → `photo2painting` for this model's domains.
    pub fn direction_names(&self) -> Vec<(Direction, String)> {
        self.directions.iter().map(|d| (*d, self.metadata.domains.direction_name(*d))).collect()
    }
}

/// Reads and checks one model file (on the CPU; workers move it to their device).
pub fn load_model(path: &Path) -> Result<(ModelInfo, ModelFile), ModelError> {
    let bytes = std::fs::read(path).map_err(|error| ModelError::Io { path: path.to_path_buf(), error })?;
    let file = ModelFile::from_bytes(&bytes, &Device::Cpu).map_err(|e| e.in_file(path))?;
    let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let info = ModelInfo {
        name,
        path: path.to_path_buf(),
        sha256: format!("{:x}", Sha256::digest(&bytes)),
        size_bytes: bytes.len() as u64,
        directions: file.generators.keys().copied().collect(),
        parameters_per_generator: file.metadata.architecture.parameter_count(),
        metadata: file.metadata.clone(),
    };
    Ok((info, file))
}

/// Every `*.safetensors` in `dir`, sorted by name. A folder without any is an error.
pub fn load_models_dir(dir: &Path) -> Result<Vec<(ModelInfo, ModelFile)>, ModelError> {
    let entries =
        std::fs::read_dir(dir).map_err(|error| ModelError::Io { path: dir.to_path_buf(), error })?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(ModelError::Io {
            path: dir.to_path_buf(),
            error: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no *.safetensors model file in this folder",
            ),
        });
    }
    paths.iter().map(|p| load_model(p)).collect()
}

/// Picks the model (by name, or the only one) and the direction (`x2y`, `y2x` or domain-named).
pub fn resolve(
    models: &[ModelInfo],
    model: Option<&str>,
    direction: &str,
) -> Result<(usize, Direction), EngineError> {
    let names = || models.iter().map(|m| m.name.clone()).collect::<Vec<_>>();
    let index = match model {
        Some(name) => models
            .iter()
            .position(|m| m.name == name)
            .ok_or_else(|| EngineError::UnknownModel { name: name.to_string(), available: names() })?,
        None if models.len() == 1 => 0,
        None => return Err(EngineError::ModelRequired { available: names() }),
    };
    let info = &models[index];
    let direction = info.metadata.domains.parse_direction(direction).map_err(EngineError::BadDirection)?;
    if !info.directions.contains(&direction) {
        return Err(EngineError::BadDirection(format!(
            "model `{}` has no {direction} ({}) generator",
            info.name,
            info.metadata.domains.direction_name(direction)
        )));
    }
    Ok((index, direction))
}
