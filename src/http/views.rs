//! The JSON bodies of `/v1/models`.

use serde::Serialize;

use crate::engine::versions::LoadFailure;
use crate::engine::{Engine, ModelVersion};
use crate::model::{Direction, GeneratorConfig};

/// A model as `/v1/models` shows it.
#[derive(Serialize)]
pub struct ModelView {
    name: String,
    domains: serde_json::Value,
    directions: Vec<DirectionView>,
    architecture: GeneratorConfig,
    parameters_per_generator: usize,
    device: String,
    /// The arithmetic of the convolutions: `f32`, or `bf16` on AMX tiles.
    precision: &'static str,
    sha256: String,
    size_bytes: u64,
    provenance: std::collections::BTreeMap<String, String>,
    memory: MemoryView,
    /// Set when the model's file has newer content that failed to load: this version, the one
    /// described here, still serves.
    #[serde(skip_serializing_if = "Option::is_none")]
    load_error: Option<LoadFailure>,
}

#[derive(Serialize)]
struct DirectionView {
    direction: Direction,
    name: String,
}

/// What the model's requests cost, and what that means under this server's budget.
#[derive(Serialize)]
struct MemoryView {
    /// Bytes one network pass needs per megapixel of padded image size.
    bytes_per_megapixel: u64,
    /// The side of the largest square image the budget takes (larger ones are shrunk or
    /// refused, as `--oversize` says).
    largest_square_side: u32,
    budget_bytes: u64,
}

impl ModelView {
    pub fn new(engine: &Engine, version: &ModelVersion, device: &str) -> Self {
        let info = &version.info;
        Self {
            name: info.name.clone(),
            domains: serde_json::json!({ "x": info.metadata.domains.x, "y": info.metadata.domains.y }),
            directions: info
                .direction_names()
                .into_iter()
                .map(|(direction, name)| DirectionView { direction, name })
                .collect(),
            architecture: info.metadata.architecture,
            parameters_per_generator: info.parameters_per_generator,
            device: device.to_string(),
            precision: engine.executor().precision_name(),
            sha256: info.sha256.clone(),
            size_bytes: info.size_bytes,
            provenance: info.metadata.provenance.clone(),
            memory: MemoryView {
                bytes_per_megapixel: version.memory.bytes_per_megapixel(),
                largest_square_side: engine.largest_square(&version.memory),
                budget_bytes: engine.memory_budget(),
            },
            load_error: engine.load_failure(&info.name),
        }
    }
}
