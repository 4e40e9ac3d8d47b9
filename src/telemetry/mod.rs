//! Traces to an OpenTelemetry collector: `--otlp-endpoint` turns them on.
//!
//! The `tracing` spans of each request (see [`crate::http::request_span`] and the engine's
//! [`crate::engine::spans`]) become OpenTelemetry spans through `tracing-opentelemetry`, and are
//! exported over OTLP/HTTP in protobuf by a batch processor on its own thread. A request never
//! waits for the export: the processor's queue is bounded, and what does not fit, or what the
//! collector does not take, is dropped and counted ([`export`]). A caller's W3C `traceparent`
//! continues its trace ([`context`]). Unset, nothing of this is built: no exporter, no thread,
//! no layer, and the engine's stage spans stay disabled.

pub mod context;
pub mod export;

use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing::{Level, Metadata};
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::{Layer, Registry};

use export::{BoundedProcessor, ExportLedger, ExportReport, WatchedExporter};

#[derive(Debug, Args)]
pub struct OtlpArgs {
    /// Export traces to this OpenTelemetry collector's OTLP/HTTP receiver (protobuf), e.g.
    /// `http://otel-collector:4318`; spans are posted to `<endpoint>/v1/traces`. Off when unset.
    #[arg(long, env = "CYCLESERVE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// The `service.name` the traces carry.
    #[arg(long, env = "CYCLESERVE_OTLP_SERVICE_NAME", default_value = "cycleserve")]
    pub otlp_service_name: String,
}

/// The target of spans never exported: requests that are not traced, such as health probes.
pub const UNTRACED_TARGET: &str = "cycleserve::untraced";

/// How long shutdown waits for the last spans to reach the collector.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// The running exporter.
pub struct Traces {
    provider: SdkTracerProvider,
    endpoint: String,
}

impl Traces {
    /// Builds the exporter when `--otlp-endpoint` is set; `None` (and nothing built) otherwise.
    /// `report` hears of every span exported or dropped.
    pub fn start(args: &OtlpArgs, report: Arc<dyn ExportReport>) -> anyhow::Result<Option<Self>> {
        let Some(endpoint) = args.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) else {
            return Ok(None);
        };
        let endpoint = traces_url(endpoint)?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(endpoint.clone())
            .build()
            .map_err(|e| anyhow::anyhow!("cannot build the OTLP exporter for {endpoint}: {e}"))?;
        // The standard OTEL_BSP_* variables tune the batch processor (schedule delay, queue size…).
        let capacity = export::queue_capacity();
        let config = BatchConfigBuilder::default().with_max_queue_size(capacity).build();
        let ledger = ExportLedger::new(capacity, report);
        let exporter = WatchedExporter::new(exporter, Arc::clone(&ledger), endpoint.clone());
        let processor = BatchSpanProcessor::new(exporter, config);
        // OTEL_RESOURCE_ATTRIBUTES adds to the resource; the flag names the service.
        let resource = Resource::builder()
            .with_service_name(args.otlp_service_name.clone())
            .with_attribute(opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(BoundedProcessor::new(processor, ledger))
            .with_resource(resource)
            .build();
        Ok(Some(Self { provider, endpoint }))
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The `tracing` layer that turns this crate's spans into OpenTelemetry spans. It takes every
    /// span of the crate, the engine's debug-level stage spans included, and warnings and errors
    /// as span events; nothing of other crates.
    pub fn layer(&self) -> Box<dyn Layer<Registry> + Send + Sync> {
        let tracer = self.provider.tracer("cycleserve");
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_tracked_inactivity(false)
            .with_filter(filter_fn(exported))
            .boxed()
    }

    /// Exports what is still queued (for at most `timeout`) and stops the exporter thread.
    pub fn shutdown(self, timeout: Duration) {
        if let Err(err) = self.provider.shutdown_with_timeout(timeout) {
            tracing::warn!(%err, "traces not all exported at shutdown");
        }
    }
}

fn exported(metadata: &Metadata<'_>) -> bool {
    exports(metadata.target(), *metadata.level(), metadata.is_span())
}

/// Spans of this crate down to debug (the engine's stage spans), and its warnings and errors,
/// which become events of the span they happen in.
fn exports(target: &str, level: Level, span: bool) -> bool {
    let ours = (target == "cycleserve" || target.starts_with("cycleserve::")) && target != UNTRACED_TARGET;
    ours && if span { level <= Level::DEBUG } else { level <= Level::WARN }
}

/// The URL spans are posted to: the collector's base URL plus `/v1/traces` (as
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is read), unless the path already names it.
fn traces_url(endpoint: &str) -> anyhow::Result<String> {
    let uri: axum::http::Uri =
        endpoint.parse().map_err(|e| anyhow::anyhow!("--otlp-endpoint `{endpoint}` is no URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => anyhow::bail!(
            "--otlp-endpoint `{endpoint}`: this build exports over plain HTTP only; send to a collector \
             or agent next to the server (it can forward with TLS)"
        ),
        _ => anyhow::bail!("--otlp-endpoint `{endpoint}` must be an http:// URL"),
    }
    let base = endpoint.trim_end_matches('/');
    Ok(if base.ends_with("/v1/traces") { base.to_string() } else { format!("{base}/v1/traces") })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_is_a_base_url_unless_it_names_the_traces_path() {
        assert_eq!(traces_url("http://collector:4318").unwrap(), "http://collector:4318/v1/traces");
        assert_eq!(traces_url("http://collector:4318/").unwrap(), "http://collector:4318/v1/traces");
        assert_eq!(traces_url("http://c:4318/otlp").unwrap(), "http://c:4318/otlp/v1/traces");
        assert_eq!(traces_url("http://c:4318/v1/traces").unwrap(), "http://c:4318/v1/traces");
        assert!(traces_url("https://c:4318").unwrap_err().to_string().contains("plain HTTP"));
        assert!(traces_url("collector:4318").is_err());
        assert!(traces_url("not a url").is_err());
    }

    #[test]
    fn only_this_crate_is_exported_spans_to_debug_and_events_from_warn() {
        assert!(exports("cycleserve::engine::worker", Level::DEBUG, true));
        assert!(exports("cycleserve", Level::INFO, true));
        assert!(!exports("cycleserve::engine", Level::TRACE, true));
        assert!(!exports(UNTRACED_TARGET, Level::INFO, true));
        assert!(!exports("cycleserve::engine", Level::INFO, false));
        assert!(exports("cycleserve::engine", Level::WARN, false));
        assert!(exports("cycleserve::engine", Level::ERROR, false));
        assert!(!exports("cycleserver", Level::INFO, true));
        assert!(!exports("tower_http::trace", Level::INFO, true));
        assert!(!exports("hyper", Level::ERROR, false));
    }
}
