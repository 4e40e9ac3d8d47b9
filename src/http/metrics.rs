//! Prometheus metrics: names `cycleserve_*` in base units, fed by the engine's observer hooks and
//! by a middleware that counts every request.

use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::engine::observer::{ModelChange, Observer, Outcome};
use crate::model::Direction;
use crate::telemetry::export::{DropReason, ExportReport};

const LATENCY_BUCKETS: [f64; 16] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];
const BATCH_BUCKETS: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// Installs the process-wide recorder and describes every metric.
pub fn install(version: &str, device: &str) -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full("cycleserve_batch_size".into()), &BATCH_BUCKETS)?
        .install_recorder()?;
    describe_counter!("cycleserve_requests_total", "HTTP requests by route, status, model and direction");
    describe_histogram!(
        "cycleserve_request_duration_seconds",
        Unit::Seconds,
        "HTTP request latency by route"
    );
    describe_histogram!(
        "cycleserve_queue_duration_seconds",
        Unit::Seconds,
        "Time requests wait for their batch"
    );
    describe_histogram!("cycleserve_inference_duration_seconds", Unit::Seconds, "Network time per batch");
    describe_histogram!("cycleserve_batch_size", "Images per batch");
    describe_histogram!("cycleserve_decode_duration_seconds", Unit::Seconds, "Image decoding time");
    describe_histogram!("cycleserve_encode_duration_seconds", Unit::Seconds, "Result encoding time");
    describe_gauge!("cycleserve_queue_depth", "Requests admitted and not yet computing");
    describe_counter!("cycleserve_images_processed_total", "Images run through a network");
    describe_counter!("cycleserve_engine_outcomes_total", "Translation requests by how they ended");
    describe_gauge!("cycleserve_build_info", "Build and runtime facts, as labels; always 1");
    describe_gauge!(
        "cycleserve_memory_budget_bytes",
        Unit::Bytes,
        "Memory that requests in flight may reserve"
    );
    describe_gauge!(
        "cycleserve_memory_reserved_bytes",
        Unit::Bytes,
        "Memory reserved now by requests (bodies, images, network passes)"
    );
    describe_counter!(
        "cycleserve_model_reloads_total",
        "Models added, replaced or removed by rescans of the models folder, by model and change"
    );
    describe_counter!(
        "cycleserve_model_reload_failures_total",
        "Model files that failed to load in a rescan (what served before still serves), by model"
    );
    describe_gauge!("cycleserve_model_files_failing", "Model files whose latest content failed to load");
    describe_gauge!(
        "cycleserve_model_versions",
        "Model versions in memory: serving, loading, or finishing their requests after a reload"
    );
    gauge!("cycleserve_build_info", "version" => version.to_string(), "device" => device.to_string())
        .set(1.0);
    gauge!("cycleserve_model_files_failing").set(0.0);
    gauge!("cycleserve_queue_depth").set(0.0);
    gauge!("cycleserve_memory_reserved_bytes").set(0.0);
    Ok(handle)
}

/// Describes the trace export's counters and shows them at zero (called when traces are exported).
pub fn describe_otlp() {
    describe_counter!("cycleserve_otlp_spans_exported_total", "Spans the OpenTelemetry collector took");
    describe_counter!(
        "cycleserve_otlp_spans_dropped_total",
        "Spans not exported, by reason (queue_full, export_failed)"
    );
    counter!("cycleserve_otlp_spans_exported_total").absolute(0);
    for reason in [DropReason::QueueFull, DropReason::ExportFailed] {
        counter!("cycleserve_otlp_spans_dropped_total", "reason" => reason.as_str()).absolute(0);
    }
}

/// Keeps histogram buckets rolled over; the exporter expects its owner to call this.
pub fn spawn_upkeep(handle: PrometheusHandle) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    });
}

/// Model and direction of a `/translate` request, left on its response for the request counter.
#[derive(Clone, Debug)]
pub struct TranslateLabels {
    pub model: String,
    pub direction: Direction,
}

/// Counts and times every request by its route template, status, model and direction.
pub async fn track(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let response = next.run(request).await;
    let (model, direction) = match response.extensions().get::<TranslateLabels>() {
        Some(l) => (l.model.clone(), l.direction.as_str().to_string()),
        None => (String::new(), String::new()),
    };
    let status = response.status().as_u16().to_string();
    counter!("cycleserve_requests_total", "route" => route.clone(), "status" => status, "model" => model, "direction" => direction)
        .increment(1);
    histogram!("cycleserve_request_duration_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// Feeds engine events into the recorder.
pub struct PrometheusObserver;

impl Observer for PrometheusObserver {
    fn queue_depth(&self, depth: usize) {
        gauge!("cycleserve_queue_depth").set(depth as f64);
    }

    fn queue_wait(&self, wait: Duration) {
        histogram!("cycleserve_queue_duration_seconds").record(wait.as_secs_f64());
    }

    fn batch(&self, model: &str, direction: Direction, size: usize, inference: Duration) {
        let labels = [("model", model.to_string()), ("direction", direction.as_str().to_string())];
        histogram!("cycleserve_inference_duration_seconds", &labels).record(inference.as_secs_f64());
        histogram!("cycleserve_batch_size").record(size as f64);
        counter!("cycleserve_images_processed_total", &labels).increment(size as u64);
    }

    fn decoded(&self, took: Duration) {
        histogram!("cycleserve_decode_duration_seconds").record(took.as_secs_f64());
    }

    fn encoded(&self, took: Duration) {
        histogram!("cycleserve_encode_duration_seconds").record(took.as_secs_f64());
    }

    fn outcome(&self, outcome: Outcome) {
        counter!("cycleserve_engine_outcomes_total", "outcome" => outcome.as_str()).increment(1);
    }

    fn memory_budget(&self, bytes: u64) {
        gauge!("cycleserve_memory_budget_bytes").set(bytes as f64);
    }

    fn memory_reserved(&self, bytes: u64) {
        gauge!("cycleserve_memory_reserved_bytes").set(bytes as f64);
    }

    fn model_changed(&self, model: &str, change: ModelChange) {
        counter!("cycleserve_model_reloads_total", "model" => model.to_string(), "change" => change.as_str())
            .increment(1);
    }

    fn model_load_failed(&self, model: &str) {
        counter!("cycleserve_model_reload_failures_total", "model" => model.to_string()).increment(1);
    }

    fn model_files_failing(&self, files: usize) {
        gauge!("cycleserve_model_files_failing").set(files as f64);
    }

    fn model_versions(&self, versions: usize) {
        gauge!("cycleserve_model_versions").set(versions as f64);
    }
}

/// Counts the spans the trace exporter sent and dropped.
pub struct OtlpMetrics;

impl ExportReport for OtlpMetrics {
    fn exported(&self, spans: u64) {
        counter!("cycleserve_otlp_spans_exported_total").increment(spans);
    }

    fn dropped(&self, reason: DropReason, spans: u64) {
        counter!("cycleserve_otlp_spans_dropped_total", "reason" => reason.as_str()).increment(spans);
    }
}
