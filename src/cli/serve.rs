//! `cycleserve serve` (and plain `cycleserve`): the HTTP server.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use crate::device::{device_name, DeviceSpec};
use crate::engine::catalog::load_models_dir;
use crate::engine::codec::DecodeOptions;
use crate::engine::reload::{self, Hangups, Reloader};
use crate::engine::{Engine, EngineConfig, Oversize};
use crate::http::auth::ApiKeys;
use crate::http::connections::ConnectionLimits;
use crate::http::{self, metrics, server, AppState, ServerConfig};
use crate::logging::{init_server_logging, LogArgs};
use crate::memory::{self, parse_bytes};
use crate::model::{Executor, Precision};
use crate::telemetry::{OtlpArgs, Traces, FLUSH_TIMEOUT};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "CYCLESERVE_HOST", default_value = "0.0.0.0")]
    host: String,
    /// Port to listen on (0 picks a free one; the log says which).
    #[arg(long, env = "CYCLESERVE_PORT", default_value_t = 8080)]
    port: u16,
    /// Folder whose *.safetensors model files are all loaded; a file's name is its model name.
    /// SIGHUP rescans it: new files are loaded, changed ones swapped, removed ones unloaded.
    #[arg(long, env = "CYCLESERVE_MODELS_DIR", default_value = "models")]
    models_dir: PathBuf,
    /// Also rescan the models folder this often (e.g. `10s`, `1m`); off by default.
    #[arg(long, env = "CYCLESERVE_MODELS_WATCH", value_parser = humantime::parse_duration)]
    models_watch: Option<Duration>,
    /// Where the networks run: auto, cpu, cuda or cuda:N.
    #[arg(long, env = "CYCLESERVE_DEVICE", default_value = "auto")]
    device: DeviceSpec,
    /// The CPU's arithmetic: bf16 convolutions on AMX tiles (about twice as fast; outputs within
    /// a few 8-bit levels of f32's), or f32; auto takes bf16 where the CPU has AMX.
    #[arg(long, env = "CYCLESERVE_PRECISION", value_enum, default_value = "auto")]
    precision: Precision,
    /// Most images per network run.
    #[arg(long, env = "CYCLESERVE_MAX_BATCH_SIZE", default_value_t = 8)]
    max_batch_size: usize,
    /// Longest a request waits for others to share its batch, in milliseconds.
    #[arg(long, env = "CYCLESERVE_MAX_BATCH_DELAY_MS", default_value_t = 5)]
    max_batch_delay_ms: u64,
    /// Requests admitted but not yet computing (reading their body, decoding, or queued); more
    /// get 503 with Retry-After.
    #[arg(long, env = "CYCLESERVE_QUEUE_CAPACITY", default_value_t = 64)]
    queue_capacity: usize,
    /// Deadline per request, from admission to encoded result, in milliseconds (504 after).
    #[arg(long, env = "CYCLESERVE_REQUEST_TIMEOUT_MS", default_value_t = 60_000)]
    request_timeout_ms: u64,
    /// Largest image upload, in bytes (413 beyond).
    #[arg(long, env = "CYCLESERVE_MAX_BODY_BYTES", default_value_t = 20 * 1024 * 1024)]
    max_body_bytes: usize,
    /// Largest image, in pixels of the padded size it runs at (each side rounded up to a multiple
    /// of 4, at least 8), checked from the header before decoding (413 beyond).
    #[arg(long, env = "CYCLESERVE_MAX_PIXELS", default_value_t = 16_777_216)]
    max_pixels: u64,
    /// Downscale inputs whose longer side exceeds this (Lanczos3) before translating; off by
    /// default, so results have the input's size.
    #[arg(long, env = "CYCLESERVE_MAX_SIDE")]
    max_side: Option<u32>,
    /// Origins allowed by CORS, comma-separated (`*` for any); CORS is off when empty.
    #[arg(long, env = "CYCLESERVE_CORS_ORIGINS", value_delimiter = ',', default_value = "")]
    cors_origins: Vec<String>,
    /// Memory that requests in flight may reserve together (decoded images, network passes,
    /// results), e.g. `1.5GiB` or `800MB`. Default: 80 % of the cgroup memory limit when one is
    /// set, else 50 % of physical memory.
    #[arg(long, env = "CYCLESERVE_MEMORY_BUDGET", value_parser = parse_bytes)]
    memory_budget: Option<u64>,
    /// Images too large for the memory budget even alone: `downscale` shrinks them until they
    /// fit (the response says so in X-Downscaled-From), `reject` answers 413.
    #[arg(long, env = "CYCLESERVE_OVERSIZE", value_enum, default_value = "downscale")]
    oversize: Oversize,
    /// Seconds to finish in-flight requests after SIGTERM before exiting anyway.
    #[arg(long, env = "CYCLESERVE_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    shutdown_grace_secs: u64,
    /// Longest a request body may take to arrive, counted from its head, in milliseconds (408
    /// after). Default: the request timeout.
    #[arg(long, env = "CYCLESERVE_BODY_TIMEOUT_MS")]
    body_timeout_ms: Option<u64>,
    /// Seconds a client has to send a request head once it has begun (the connection is closed
    /// after; guards against slow-header clients).
    #[arg(long, env = "CYCLESERVE_HEADER_TIMEOUT_SECS", default_value_t = 10)]
    header_timeout_secs: u64,
    /// Seconds a kept-alive connection may wait for its next request before it is closed.
    #[arg(long, env = "CYCLESERVE_IDLE_TIMEOUT_SECS", default_value_t = 60)]
    idle_timeout_secs: u64,
    /// Most connections open at once; further ones wait in the listen backlog.
    #[arg(long, env = "CYCLESERVE_MAX_CONNECTIONS", default_value_t = 1024)]
    max_connections: usize,
    /// An API key that `/translate` and `/v1/models*` then require as `Authorization: Bearer
    /// KEY` (401 without); health, readiness, the page and the spec stay open.
    #[arg(long, env = "CYCLESERVE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// A file of API keys, one a line, all accepted (together with --api-key).
    #[arg(long, env = "CYCLESERVE_API_KEY_FILE")]
    api_key_file: Option<PathBuf>,
    /// Serve `/metrics` on this port (same host) instead of the public one.
    #[arg(long, env = "CYCLESERVE_METRICS_PORT")]
    metrics_port: Option<u16>,
    /// Serve the try-it web page at `/` (`--ui false` leaves `/` a 404).
    #[arg(long, env = "CYCLESERVE_UI", default_value_t = true, action = clap::ArgAction::Set)]
    ui: bool,
    #[command(flatten)]
    otlp: OtlpArgs,
}

/// Sets up logging (and the trace exporter, when asked for) and serves until shut down.
pub fn run(args: ServeArgs, logging: &LogArgs) -> anyhow::Result<()> {
    let traces = Traces::start(&args.otlp, Arc::new(metrics::OtlpMetrics))?;
    init_server_logging(logging, traces.as_ref().map(Traces::layer));
    if let Some(traces) = &traces {
        tracing::info!(endpoint = traces.endpoint(), service = %args.otlp.otlp_service_name, "exporting traces");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = runtime.block_on(serve(args, traces.is_some()));
    // Past the grace period, blocking tasks may still be running: do not wait for them.
    runtime.shutdown_background();
    if let Some(traces) = traces {
        traces.shutdown(FLUSH_TIMEOUT);
    }
    result
}

async fn serve(args: ServeArgs, traced: bool) -> anyhow::Result<()> {
    let device = args.device.open()?;
    let device_label = device_name(&device);
    let executor = Executor::choose(&device, args.precision)?;
    tracing::info!(device = %device_label, precision = executor.precision_name(), "networks");
    let models = load_models_dir(&args.models_dir)?;
    for (info, _) in &models {
        tracing::info!(
            model = %info.name,
            directions = ?info.direction_names().into_iter().map(|(_, n)| n).collect::<Vec<_>>(),
            architecture = %info.metadata.architecture,
            sha256 = %info.sha256,
            "loading"
        );
    }
    let request_timeout = Duration::from_millis(args.request_timeout_ms);
    let memory_budget = match args.memory_budget {
        Some(bytes) => bytes,
        None => memory::default_budget()?,
    };
    tracing::info!(memory_budget_bytes = memory_budget, oversize = ?args.oversize, "memory budget");
    let config = EngineConfig {
        max_batch_size: args.max_batch_size.max(1),
        max_batch_delay: Duration::from_millis(args.max_batch_delay_ms),
        queue_capacity: args.queue_capacity.max(1),
        request_timeout,
        decode: DecodeOptions {
            max_bytes: args.max_body_bytes,
            max_pixels: args.max_pixels,
            max_side: args.max_side,
        },
        memory_budget,
        oversize: args.oversize,
    };
    let metrics_handle = metrics::install(env!("CARGO_PKG_VERSION"), &device_label)?;
    metrics::spawn_upkeep(metrics_handle.clone());
    if traced {
        metrics::describe_otlp();
    }
    let engine = Engine::new(models, vec![device], executor, config, Arc::new(metrics::PrometheusObserver));
    let engine = Arc::new(engine);
    refuse_models_beyond_the_budget(&engine)?;
    // Before the server announces itself: from here on SIGHUP rescans instead of ending us.
    let hangups = Hangups::listen()?;
    let reloader = Arc::new(Reloader::new(Arc::clone(&engine), args.models_dir.clone()));
    if let Some(interval) = args.models_watch {
        tracing::info!(dir = %args.models_dir.display(), interval = %humantime::format_duration(interval), "watching the models folder");
    }
    tokio::spawn(reload::watch(reloader, args.models_watch.filter(|i| !i.is_zero()), hangups));
    let state = AppState {
        engine,
        metrics: Some(metrics_handle),
        device: device_label,
        max_body_bytes: args.max_body_bytes,
    };
    let mut keys: Vec<String> = args.api_key.into_iter().collect();
    if let Some(path) = &args.api_key_file {
        keys.extend(ApiKeys::read_file(path)?);
    }
    let api_keys = ApiKeys::new(keys);
    let cors_origins: Vec<String> = args.cors_origins.into_iter().filter(|o| !o.is_empty()).collect();
    if !api_keys.is_empty() {
        tracing::info!(keys = api_keys.len(), "API keys required");
        if cors_origins.iter().any(|o| o == "*") {
            tracing::warn!(
                "CORS allows any origin while API keys are required: any web page can use a key it is given"
            );
        }
    }
    let server_config = ServerConfig {
        addr: server::address(&args.host, args.port)?,
        max_body_bytes: args.max_body_bytes,
        cors_origins,
        // Uploads and queueing are covered by the engine's deadline; this only catches the rest.
        request_timeout: request_timeout + Duration::from_secs(30),
        shutdown_grace: Duration::from_secs(args.shutdown_grace_secs),
        ui: args.ui,
        body_timeout: args.body_timeout_ms.map_or(request_timeout, Duration::from_millis),
        connections: ConnectionLimits {
            header_timeout: Duration::from_secs(args.header_timeout_secs),
            idle_timeout: Duration::from_secs(args.idle_timeout_secs),
            max_connections: args.max_connections.max(1),
        },
        api_keys,
        metrics_addr: args.metrics_port.map(|port| server::address(&args.host, port)).transpose()?,
        traces: traced,
    };
    http::server::serve(state, server_config).await
}

/// A model whose smallest image does not fit the budget could never serve a request: refuse to
/// start, naming what it needs, rather than answer every request with 413. (A rescan refuses
/// such a file the same way, and keeps serving.)
fn refuse_models_beyond_the_budget(engine: &Engine) -> anyhow::Result<()> {
    for version in engine.models().iter() {
        engine.check_fits_budget(&version.info, &version.memory).map_err(anyhow::Error::msg)?;
    }
    Ok(())
}
