//! The inference engine: from encoded image to encoded result for many concurrent callers.
//!
//! admission (a queue slot, and the body's bytes in the memory [`budget`]) → header probe and
//! costing ([`footprint`]) → decode (blocking pool) → bounded queue → dynamic batcher
//! ([`queue`]) → one worker thread per device ([`worker`]) → encode (blocking pool). The async
//! runtime only awaits; decoding and encoding of some requests overlap with inference of others.
//! Every stage's memory is reserved before it is spent and released when it is freed. Models
//! are found and named by the [`catalog`], routed to by [`versions`] (one loaded version per
//! name, swapped whole), and rescanned from their folder by [`reload`]; images are decoded and
//! encoded by the [`codec`]; what happens is reported through an [`observer`].

pub mod budget;
pub mod catalog;
pub mod codec;
pub mod footprint;
pub mod observer;
pub mod queue;
pub mod reload;
pub mod spans;
pub mod versions;
pub mod worker;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use candle_core::Device;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tracing::field::Empty;
use tracing::Instrument;

use crate::model::{Direction, Executor, ModelFile};
use budget::{Admission, MemoryBudget};
pub use catalog::ModelInfo;
use codec::{DecodeOptions, ImageError, ImageHeader, OutputFormat};
use footprint::{Footprint, MemoryModel};
use observer::{Observer, Outcome};
use queue::{BatchKey, Computed, Entry, Queue};
use spans::QueuedSpans;
pub use versions::ModelVersion;
use versions::{LoadFailure, Retirement, Routing};
pub use worker::run_batch;
use worker::{BatchRunner, Command, Initial, ModelRunner, RunnerFactory, WorkerContext};

/// What to do with an image that could never fit the memory budget, even alone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Oversize {
    /// Answer 413 naming the largest size that fits.
    Reject,
    /// Shrink it to the largest size that fits, and say so in the response.
    #[default]
    Downscale,
}

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub max_batch_size: usize,
    pub max_batch_delay: Duration,
    /// Requests admitted and not yet computing (reading their body, decoding, or queued);
    /// beyond it: Overloaded.
    pub queue_capacity: usize,
    /// From admission to encoded result.
    pub request_timeout: Duration,
    pub decode: DecodeOptions,
    /// Bytes that requests in flight may hold together.
    pub memory_budget: u64,
    pub oversize: Oversize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch_size: 8,
            max_batch_delay: Duration::from_millis(5),
            queue_capacity: 64,
            request_timeout: Duration::from_secs(60),
            decode: DecodeOptions::default(),
            memory_budget: 4 << 30,
            oversize: Oversize::default(),
        }
    }
}

/// Why a translation did not happen.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("no model named `{name}`; loaded: {}", available.join(", "))]
    UnknownModel { name: String, available: Vec<String> },
    #[error("several models are loaded; choose one with `model` ({})", available.join(", "))]
    ModelRequired { available: Vec<String> },
    #[error("no model is loaded")]
    NoModels,
    #[error("{0}")]
    BadDirection(String),
    #[error("the server is busy; retry shortly")]
    Overloaded,
    #[error(
        "a {width}×{height} image needs about {} MiB with model `{model}`, more than this \
         server's memory budget of {} MiB; the largest image it accepts for that model is \
         about {largest_side}×{largest_side} ({} megapixels)",
        needed >> 20, budget >> 20, (*largest_side as u64 * *largest_side as u64) / 1_000_000
    )]
    TooLarge { width: u32, height: u32, model: String, needed: u64, budget: u64, largest_side: u32 },
    #[error("the request did not finish within its deadline")]
    TimedOut,
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl EngineError {
    fn outcome(&self) -> Outcome {
        match self {
            Self::Overloaded => Outcome::Overloaded,
            Self::TimedOut => Outcome::TimedOut,
            Self::ShuttingDown => Outcome::ShuttingDown,
            Self::TooLarge { .. } => Outcome::TooLarge,
            Self::Image(ImageError::TooManyBytes { .. } | ImageError::TooManyPixels { .. }) => {
                Outcome::TooLarge
            }
            Self::Image(ImageError::TooMuchMemory(_)) => Outcome::TooLarge,
            Self::Image(ImageError::Encode(_)) | Self::Internal(_) => Outcome::Internal,
            Self::Image(_) => Outcome::BadImage,
            Self::UnknownModel { .. }
            | Self::ModelRequired { .. }
            | Self::NoModels
            | Self::BadDirection(_) => Outcome::BadRequest,
        }
    }
}

/// Time spent in each stage of one request.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timings {
    pub decode: Duration,
    pub queue: Duration,
    pub inference: Duration,
    pub encode: Duration,
}

/// A finished translation.
#[derive(Debug)]
pub struct Translation {
    pub bytes: Vec<u8>,
    pub format: OutputFormat,
    pub width: u32,
    pub height: u32,
    /// Set when `max_side` or the memory budget shrank the input first.
    pub downscaled_from: Option<(u32, u32)>,
    pub batch_size: usize,
    pub timings: Timings,
}

/// What a caller asks for: one version of a model (which answers the request, whatever reloads
/// happen meanwhile) and a direction.
#[derive(Clone, Debug)]
pub struct Target {
    pub model: Arc<ModelVersion>,
    pub direction: Direction,
}

/// A request's place in the engine, taken before its body is read: a queue slot and the
/// body's bytes in the memory budget. Both are held until the image is decoded.
pub struct Ticket {
    slot: OwnedSemaphorePermit,
    body: Admission,
}

impl Ticket {
    /// The body turned out `bytes` long: release the rest of what was reserved for it.
    pub fn body_read(&mut self, bytes: usize) {
        self.body.shrink_to(bytes as u64);
    }
}

pub struct Engine {
    routing: Routing,
    retirement: Arc<Retirement>,
    /// Runs the networks; decides how their memory is costed.
    executor: Executor,
    config: EngineConfig,
    context: Arc<WorkerContext>,
    workers: Mutex<Vec<std::thread::JoinHandle<Result<(), String>>>>,
    worker_count: usize,
    /// Set when shutdown begins: the one flag readiness and admission both read.
    closing: AtomicBool,
}

impl Engine {
    /// Starts one worker per device, each loading every model; returns at once (see
    /// [`Engine::is_ready`]). The models are routed to from the start: requests wait in the
    /// queue until the workers have loaded them.
    pub fn new(
        models: Vec<(ModelInfo, ModelFile)>,
        devices: Vec<Device>,
        executor: Executor,
        config: EngineConfig,
        observer: Arc<dyn Observer>,
    ) -> Self {
        let factories: Vec<RunnerFactory> = devices
            .into_iter()
            .map(|device| {
                Box::new(move || Ok(Box::new(ModelRunner::new(device, executor)) as Box<dyn BatchRunner>))
                    as RunnerFactory
            })
            .collect();
        Self::with_runners(models, executor, factories, config, observer)
    }

    /// What runs the networks.
    pub fn executor(&self) -> Executor {
        self.executor
    }

    /// Starts one worker per runner factory, each loading every model; the runners stand for
    /// devices and run the models with `executor` (which decides how their memory is costed).
    pub fn with_runners(
        models: Vec<(ModelInfo, ModelFile)>,
        executor: Executor,
        factories: Vec<RunnerFactory>,
        config: EngineConfig,
        observer: Arc<dyn Observer>,
    ) -> Self {
        let capacity = config.queue_capacity.max(1);
        let reporter = Arc::clone(&observer);
        let budget =
            MemoryBudget::new(config.memory_budget, Box::new(move |bytes| reporter.memory_reserved(bytes)));
        observer.memory_budget(config.memory_budget);
        let queue = Arc::new(Queue::new(factories.len()));
        let retirement = Retirement::new(Arc::clone(&queue), Arc::clone(&observer));
        let routing = Routing::default();
        let mut initial: Vec<Vec<Initial>> = factories.iter().map(|_| Vec::new()).collect();
        for (info, file) in models {
            let version = retirement.version(info, memory_model(&file, executor));
            for loads in &mut initial {
                let name = version.info.name.clone();
                loads.push(Initial { version: version.id, name, file: file.clone() });
            }
            routing.route(&version.info.name.clone(), Some(version));
        }
        let context = Arc::new(WorkerContext {
            queue,
            slots: Arc::new(Semaphore::new(capacity)),
            capacity,
            observer,
            budget,
            max_batch_size: config.max_batch_size.max(1),
            max_batch_delay: config.max_batch_delay,
            ready: Default::default(),
            failures: Default::default(),
        });
        let worker_count = factories.len();
        let workers = factories
            .into_iter()
            .zip(initial)
            .enumerate()
            .map(|(i, (factory, initial))| {
                let context = Arc::clone(&context);
                std::thread::Builder::new()
                    .name(format!("worker-{i}"))
                    .spawn(move || {
                        let result = worker::work(Arc::clone(&context), i, factory, initial);
                        if let Err(message) = &result {
                            tracing::error!(worker = i, %message, "worker could not start");
                            context.failures.lock().unwrap_or_else(|p| p.into_inner()).push(message.clone());
                        }
                        result
                    })
                    .expect("cannot spawn an inference worker thread")
            })
            .collect();
        Self {
            routing,
            retirement,
            executor,
            config,
            context,
            workers: Mutex::new(workers),
            worker_count,
            closing: AtomicBool::new(false),
        }
    }

    /// The models routed to now, sorted by name.
    pub fn models(&self) -> Arc<[Arc<ModelVersion>]> {
        self.routing.snapshot()
    }

    /// The routed version of the model called `name`.
    pub fn model(&self, name: &str) -> Option<Arc<ModelVersion>> {
        self.models().iter().find(|m| m.info.name == name).cloned()
    }

    /// Model files whose latest content failed to load (see [`reload`]).
    pub fn load_failures(&self) -> Vec<LoadFailure> {
        self.routing.failures()
    }

    pub fn load_failure(&self, model: &str) -> Option<LoadFailure> {
        self.routing.failure(model)
    }

    /// Model versions in memory: routed to, loading, or finishing their requests after a reload.
    pub fn versions_in_memory(&self) -> usize {
        self.retirement.alive()
    }

    pub fn memory_budget(&self) -> u64 {
        self.config.memory_budget
    }

    /// The largest square image a model costed as `memory` accepts within the budget.
    pub fn largest_square(&self, memory: &MemoryModel) -> u32 {
        memory.largest_square(self.config.memory_budget, self.config.decode.max_bytes as u64)
    }

    /// A model whose smallest image does not fit the budget could never serve a request: say
    /// what it needs.
    pub fn check_fits_budget(&self, info: &ModelInfo, memory: &MemoryModel) -> Result<(), String> {
        if self.largest_square(memory) >= crate::model::pixels::MIN_NETWORK_SIDE {
            return Ok(());
        }
        Err(format!(
            "model `{}` ({}) needs {} MiB for even an 8×8 image, more than the memory budget of {} MiB",
            info.name,
            info.metadata.architecture,
            memory.network_bytes(1, 8, 8) >> 20,
            self.config.memory_budget >> 20
        ))
    }

    /// Loads a new version of a model on every worker and warms it up there; it is not routed to
    /// until [`Engine::route`] says so. Requests keep flowing meanwhile (each worker loads
    /// between batches).
    pub async fn prepare(&self, info: ModelInfo, file: ModelFile) -> Result<Arc<ModelVersion>, String> {
        let memory = memory_model(&file, self.executor);
        self.check_fits_budget(&info, &memory)?;
        // Should a worker fail, dropping the version unloads it from the others.
        let version = self.retirement.version(info, memory);
        let replies: Vec<_> = (0..self.worker_count)
            .map(|worker| {
                let (done, reply) = oneshot::channel();
                let load = Command::Load { version: version.id, file: file.clone(), done };
                self.context.queue.send(worker, load);
                reply
            })
            .collect();
        drop(file);
        for reply in replies {
            reply.await.map_err(|_| "the inference worker stopped".to_string())??;
        }
        Ok(version)
    }

    /// From now on, requests naming `name` get `version` (or, with `None`, an unknown-model
    /// error); requests already holding the previous version finish on it, and it is unloaded
    /// once the last of them ends. Returns the previous version.
    pub fn route(&self, name: &str, version: Option<Arc<ModelVersion>>) -> Option<Arc<ModelVersion>> {
        self.routing.route(name, version)
    }

    /// Records, or clears with `None`, that `model`'s file failed to load.
    pub fn set_load_failure(&self, model: &str, failure: Option<LoadFailure>) {
        let failing = self.routing.set_failure(model, failure);
        self.context.observer.model_files_failing(failing);
    }

    pub fn observer(&self) -> &Arc<dyn Observer> {
        &self.context.observer
    }

    /// Every worker has loaded its first models and run its warm-up inference, some model is
    /// routed to, and shutdown has not begun. Reloads leave it ready: versions are routed to
    /// only once loaded.
    pub fn is_ready(&self) -> bool {
        self.context.ready.load(Ordering::SeqCst) == self.worker_count
            && !self.routing.snapshot().is_empty()
            && !self.is_shutting_down()
    }

    pub fn is_shutting_down(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// Readiness fails and new requests are refused from now on; [`Engine::shutdown`] drains.
    pub fn begin_shutdown(&self) {
        self.closing.store(true, Ordering::SeqCst);
    }

    /// Why a worker could not load its models, if one could not.
    pub fn failed_worker(&self) -> Option<String> {
        let failures = self.context.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures.first().map(|f| format!("an inference worker could not start: {f}"))
    }

    /// Requests admitted and not yet computing.
    pub fn queue_depth(&self) -> usize {
        self.context.queue_depth()
    }

    pub fn resolve(&self, model: Option<&str>, direction: &str) -> Result<Target, EngineError> {
        catalog::resolve(&self.routing.snapshot(), model, direction)
            .map(|(model, direction)| Target { model, direction })
    }

    /// Takes a queue slot and reserves room for a body of up to `max_body` bytes, before any of
    /// it is read: Overloaded at once when either is not to be had.
    pub fn admit(&self, max_body: u64) -> Result<Ticket, EngineError> {
        let result = self.try_ticket(max_body);
        if let Err(err) = &result {
            self.context.observer.outcome(err.outcome());
        }
        self.context.report_queue_depth();
        result
    }

    fn try_ticket(&self, max_body: u64) -> Result<Ticket, EngineError> {
        if self.is_shutting_down() {
            return Err(EngineError::ShuttingDown);
        }
        let slot =
            Arc::clone(&self.context.slots).try_acquire_owned().map_err(|_| EngineError::Overloaded)?;
        let body = self.context.budget.try_admit(max_body, 0, 0).ok_or(EngineError::Overloaded)?;
        Ok(Ticket { slot, body })
    }

    /// Translates one encoded image. Dropping the future before the batch starts keeps the
    /// request from being computed; the memory it reserved stays reserved until the work it
    /// stands for (a decode already running, say) has ended.
    pub async fn translate(
        &self,
        ticket: Ticket,
        target: Target,
        bytes: Bytes,
        format: OutputFormat,
    ) -> Result<Translation, EngineError> {
        let deadline = tokio::time::Instant::now() + self.config.request_timeout;
        let work = self.run(ticket, target, bytes, format, deadline);
        let result = tokio::time::timeout_at(deadline, work).await.unwrap_or(Err(EngineError::TimedOut));
        let outcome = result.as_ref().map_or_else(EngineError::outcome, |_| Outcome::Ok);
        self.context.observer.outcome(outcome);
        // A request that failed before its batch gave its slot back without the worker seeing it.
        self.context.report_queue_depth();
        result
    }

    async fn run(
        &self,
        ticket: Ticket,
        target: Target,
        bytes: Bytes,
        format: OutputFormat,
        deadline: tokio::time::Instant,
    ) -> Result<Translation, EngineError> {
        let started = Instant::now();
        let decode_span = tracing::debug_span!("decode", width = Empty, height = Empty);
        let options = self.config.decode;
        // The ticket travels with the blocking work: a deadline or a departed caller cannot
        // free its slot and bytes while a probe or decode still uses them.
        let (header, bytes, ticket) =
            blocking(move || codec::probe(&bytes, &options).map(|h| (h, bytes, ticket))).await??;
        decode_span.record("width", i64::from(header.width)).record("height", i64::from(header.height));
        let (fit_side, footprint) = self.plan(&target, &header, bytes.len() as u64)?;
        // The body is already reserved by the ticket.
        let admission = self
            .context
            .budget
            .admit(footprint.decoding, footprint.waiting, footprint.network)
            .instrument(tracing::debug_span!(parent: &decode_span, "memory_wait"))
            .await;
        let waiting = footprint.waiting;
        let (image, slot, admission) = blocking(move || {
            let Ticket { slot, body } = ticket;
            let mut admission = admission;
            let image = codec::decode_probed(&bytes, &header, fit_side);
            drop((bytes, body));
            admission.shrink_to(waiting);
            image.map(|image| (image, slot, admission))
        })
        .await??;
        let decode = started.elapsed();
        drop(decode_span);
        self.context.observer.decoded(decode);

        let (width, height) = image.padded_size();
        let key = BatchKey { model: target.model.id, direction: target.direction, width, height };
        let (reply, receiver) = oneshot::channel();
        let downscaled_from = image.downscaled_from;
        let enqueued = Instant::now();
        let model = target.model;
        let deadline = deadline.into_std();
        let spans = QueuedSpans::enqueued();
        let entry =
            Entry { key, model, image, enqueued, deadline, reply, slot: Some(slot), admission, spans };
        self.context.queue.push(entry).map_err(|_| EngineError::ShuttingDown)?;
        let computed =
            receiver.await.map_err(|_| EngineError::Internal("the inference worker stopped".into()))??;

        let encode_started = Instant::now();
        let Computed { image, admission, queue_wait, inference, batch_size } = computed;
        let (out_width, out_height) = (image.width(), image.height());
        let bytes = blocking(move || {
            let encoded = codec::encode(&image, format);
            drop((image, admission));
            encoded
        })
        .instrument(tracing::debug_span!("encode", format = format.mime_type()))
        .await??;
        let encode = encode_started.elapsed();
        self.context.observer.encoded(encode);
        Ok(Translation {
            bytes,
            format,
            width: out_width,
            height: out_height,
            downscaled_from,
            batch_size,
            timings: Timings { decode, queue: queue_wait, inference, encode },
        })
    }

    /// The side to fit the image within and its footprint; refuses an image that can never fit
    /// the budget beside its `body` (or, with [`Oversize::Downscale`], shrinks it until it does).
    fn plan(
        &self,
        target: &Target,
        header: &ImageHeader,
        body: u64,
    ) -> Result<(Option<u32>, Footprint), EngineError> {
        let memory = &target.model.memory;
        let budget = self.config.memory_budget;
        let available = budget.saturating_sub(body);
        let max_side = self.config.decode.max_side;
        let footprint = memory.footprint(header, max_side);
        if footprint.alone() <= available {
            return Ok((max_side, footprint));
        }
        let (width, height) = header.fitted(max_side);
        let shrunk = match self.config.oversize {
            Oversize::Downscale => memory.fit_side(header, width.max(height), available),
            Oversize::Reject => None,
        };
        match shrunk {
            Some(side) => Ok((Some(side), memory.footprint(header, Some(side)))),
            None => Err(EngineError::TooLarge {
                width: header.width,
                height: header.height,
                model: target.model.info.name.clone(),
                needed: body + footprint.alone(),
                budget,
                largest_side: self.largest_square(memory),
            }),
        }
    }

    /// Stops admitting requests, lets the workers finish everything admitted, and waits for them.
    pub async fn shutdown(&self) {
        self.begin_shutdown();
        // Holding every slot means each admitted request has been taken by a worker (or gave
        // up): requests still decoding are not cut off by closing the queue under them.
        let all_slots = self.context.slots.acquire_many(self.context.capacity as u32).await;
        self.context.queue.close();
        drop(all_slots);
        let workers = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|p| p.into_inner()));
        let _ = tokio::task::spawn_blocking(move || {
            for worker in workers {
                let _ = worker.join();
            }
        })
        .await;
    }
}

/// How requests to a model are costed when `executor` runs it.
fn memory_model(file: &ModelFile, executor: Executor) -> MemoryModel {
    MemoryModel { architecture: file.metadata.architecture, executor, threads: rayon::current_num_threads() }
}

/// Runs `work` on the blocking pool; a panic there is an internal error.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, EngineError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| EngineError::Internal(format!("a blocking task failed: {e}")))
}
