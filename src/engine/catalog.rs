//! The models an engine serves: found in a folder, checked, described.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::versions::ModelVersion;
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
    let sha256 = sha256_hex(&bytes);
    parse_model(path, &bytes, sha256).map_err(|e| e.in_file(path))
}

/// Checks the content `bytes` (with that SHA-256, hex) of the model file `path`; errors do not
/// repeat the path.
pub fn parse_model(path: &Path, bytes: &[u8], sha256: String) -> Result<(ModelInfo, ModelFile), ModelError> {
    let file = ModelFile::from_bytes(bytes, &Device::Cpu)?;
    let info = ModelInfo {
        name: model_name(path),
        path: path.to_path_buf(),
        sha256,
        size_bytes: bytes.len() as u64,
        directions: file.generators.keys().copied().collect(),
        parameters_per_generator: file.metadata.architecture.parameter_count(),
        metadata: file.metadata.clone(),
    };
    Ok((info, file))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// The model a file stands for: its name without `.safetensors`.
pub fn model_name(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// The `*.safetensors` files in `dir`, sorted by name.
pub fn model_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    paths.sort();
    Ok(paths)
}

/// Every `*.safetensors` in `dir`, sorted by name. A folder without any is an error.
pub fn load_models_dir(dir: &Path) -> Result<Vec<(ModelInfo, ModelFile)>, ModelError> {
    let paths = model_files(dir).map_err(|error| ModelError::Io { path: dir.to_path_buf(), error })?;
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
    models: &[Arc<ModelVersion>],
    model: Option<&str>,
    direction: &str,
) -> Result<(Arc<ModelVersion>, Direction), EngineError> {
    let names = || models.iter().map(|m| m.info.name.clone()).collect::<Vec<_>>();
    let version = match (model, models) {
        (Some(name), _) => models
            .iter()
            .find(|m| m.info.name == name)
            .ok_or_else(|| EngineError::UnknownModel { name: name.to_string(), available: names() })?,
        (None, [only]) => only,
        (None, []) => return Err(EngineError::NoModels),
        (None, _) => return Err(EngineError::ModelRequired { available: names() }),
    };
    let info = &version.info;
    let direction = info.metadata.domains.parse_direction(direction).map_err(EngineError::BadDirection)?;
    if !info.directions.contains(&direction) {
        return Err(EngineError::BadDirection(format!(
            "model `{}` has no {direction} ({}) generator",
            info.name,
            info.metadata.domains.direction_name(direction)
        )));
    }
    Ok((Arc::clone(version), direction))
}
