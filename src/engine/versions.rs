//! The models requests are routed to, one loaded version per name, swapped as a whole.
//!
//! A request resolves its model once, to an `Arc` of one [`ModelVersion`], and carries it to
//! the end: whatever a reload publishes meanwhile, it is computed and answered by that version.
//! A version no longer routed to lives on while requests hold it; when the last one lets go,
//! its drop tells every worker to unload its networks.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use serde::Serialize;

use super::catalog::ModelInfo;
use super::footprint::MemoryModel;
use super::observer::Observer;
use super::queue::Queue;
use super::worker::Command;

/// Names one loaded version of one model file; never reused within a process.
pub type VersionId = u64;

/// One version of a model, loaded (or loading) on every worker.
pub struct ModelVersion {
    pub id: VersionId,
    pub info: ModelInfo,
    /// How its requests are costed in the memory budget.
    pub memory: MemoryModel,
    retirement: Arc<Retirement>,
}

impl std::fmt::Debug for ModelVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelVersion")
            .field("id", &self.id)
            .field("name", &self.info.name)
            .field("sha256", &self.info.sha256)
            .finish()
    }
}

impl Drop for ModelVersion {
    fn drop(&mut self) {
        self.retirement.retire(self.id);
    }
}

/// Unloads versions nobody holds any more, and counts those alive.
pub struct Retirement {
    queue: Arc<Queue>,
    observer: Arc<dyn Observer>,
    alive: AtomicUsize,
    next_id: std::sync::atomic::AtomicU64,
}

impl Retirement {
    pub fn new(queue: Arc<Queue>, observer: Arc<dyn Observer>) -> Arc<Self> {
        Arc::new(Self { queue, observer, alive: AtomicUsize::new(0), next_id: Default::default() })
    }

    /// A new version of `info`, with a fresh id; its workers are told to load it separately.
    pub fn version(self: &Arc<Self>, info: ModelInfo, memory: MemoryModel) -> Arc<ModelVersion> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let alive = self.alive.fetch_add(1, Ordering::SeqCst) + 1;
        self.observer.model_versions(alive);
        Arc::new(ModelVersion { id, info, memory, retirement: Arc::clone(self) })
    }

    fn retire(&self, id: VersionId) {
        self.queue.broadcast(|| Command::Unload(id));
        let alive = self.alive.fetch_sub(1, Ordering::SeqCst) - 1;
        self.observer.model_versions(alive);
    }

    /// Versions in memory: routed to, loading, or finishing the requests that resolved to them.
    pub fn alive(&self) -> usize {
        self.alive.load(Ordering::SeqCst)
    }
}

/// A model file whose latest content could not be loaded.
#[derive(Clone, Debug, Serialize)]
pub struct LoadFailure {
    /// The model name the file stands for (its name without `.safetensors`).
    pub model: String,
    pub file: String,
    /// SHA-256 of the content that failed; absent when the file could not be read.
    pub sha256: Option<String>,
    pub error: String,
    /// When it failed, RFC 3339 (UTC).
    pub failed_at: String,
}

impl LoadFailure {
    pub fn new(model: &str, file: &str, sha256: Option<String>, error: String) -> Self {
        Self {
            model: model.to_string(),
            file: file.to_string(),
            sha256,
            error,
            failed_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        }
    }
}

/// The routing table (sorted by name) and the files that failed to load.
#[derive(Default)]
pub struct Routing {
    table: RwLock<Arc<[Arc<ModelVersion>]>>,
    failures: Mutex<BTreeMap<String, LoadFailure>>,
}

impl Routing {
    /// The models routed to now; later changes do not affect the snapshot.
    pub fn snapshot(&self) -> Arc<[Arc<ModelVersion>]> {
        Arc::clone(&self.table.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Routes `name` to `version` (or nowhere) from now on, in one step; returns what it
    /// replaced. The caller drops that outside any lock of its own.
    pub fn route(&self, name: &str, version: Option<Arc<ModelVersion>>) -> Option<Arc<ModelVersion>> {
        let mut table = self.table.write().unwrap_or_else(|p| p.into_inner());
        let mut models: Vec<Arc<ModelVersion>> = table.iter().cloned().collect();
        let old = models.iter().position(|m| m.info.name == name).map(|i| models.remove(i));
        if let Some(version) = version {
            let at = models.partition_point(|m| m.info.name.as_str() < name);
            models.insert(at, version);
        }
        *table = models.into();
        old
    }

    pub fn failures(&self) -> Vec<LoadFailure> {
        self.lock_failures().values().cloned().collect()
    }

    pub fn failure(&self, model: &str) -> Option<LoadFailure> {
        self.lock_failures().get(model).cloned()
    }

    /// Records (or, with `None`, clears) the failure of `model`'s file; returns how many files
    /// are failing now.
    pub fn set_failure(&self, model: &str, failure: Option<LoadFailure>) -> usize {
        let mut failures = self.lock_failures();
        match failure {
            Some(failure) => failures.insert(model.to_string(), failure),
            None => failures.remove(model),
        };
        failures.len()
    }

    fn lock_failures(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, LoadFailure>> {
        self.failures.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A version of a small made-up model, for unit tests of what carries versions around.
#[cfg(test)]
pub(crate) fn test_version() -> Arc<ModelVersion> {
    use crate::model::{Direction, Domains, Executor, Family, GeneratorConfig, ModelMetadata};
    let architecture = GeneratorConfig { family: Family::Upsample, ngf: 8, n_blocks: 2, norm_affine: false };
    let info = ModelInfo {
        name: "test".into(),
        path: "test.safetensors".into(),
        sha256: "0".repeat(64),
        size_bytes: 0,
        directions: Direction::BOTH.to_vec(),
        parameters_per_generator: architecture.parameter_count(),
        metadata: ModelMetadata {
            architecture,
            domains: Domains::parse("photo,painting").unwrap(),
            provenance: Default::default(),
        },
    };
    let retirement = Retirement::new(Arc::new(Queue::new(0)), Arc::new(super::observer::NoopObserver));
    retirement.version(info, MemoryModel { architecture, executor: Executor::FastCpu, threads: 1 })
}
