//! Logging for both binaries: text or JSON lines on stderr, filtered by level or tracing
//! directives. `cycletrain` also draws progress bars (`tracing-indicatif`) on a terminal; log
//! lines then go through the bars' writer, which clears and redraws them around each line. The
//! server may add the layer that exports traces (see [`crate::telemetry`]).

use std::io::IsTerminal;

use clap::{Args, ValueEnum};
use tracing_indicatif::filter::{hide_indicatif_span_fields, IndicatifFilter};
use tracing_indicatif::IndicatifLayer;
use tracing_subscriber::fmt::format::DefaultFields;
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log lines as text or as JSON objects.
    #[arg(long, env = "CYCLESERVE_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Log filter: a level (info, debug…) or tracing directives (`cycleserve=debug,tower_http=info`).
    #[arg(long, env = "CYCLESERVE_LOG_LEVEL", default_value = "info", value_parser = parse_filter)]
    log_level: String,
}

fn parse_filter(directives: &str) -> Result<String, String> {
    EnvFilter::try_new(directives).map(|_| directives.to_string()).map_err(|e| e.to_string())
}

/// How a long task shows its progress, as [`init_logging_with_progress`] set it up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressOutput {
    /// Spans with an `indicatif.pb_show` field get a bar on the terminal.
    Bars,
    /// No terminal to draw on: report progress as log lines.
    LogLines,
}

/// Logging without progress bars (the commands other than the trainer).
pub fn init_logging(args: &LogArgs) {
    install(args, false, None);
}

/// Logging for the server, with the trace exporter's layer when traces are exported. That layer
/// has its own filter: `--log-level` does not decide which spans are exported.
pub fn init_server_logging(args: &LogArgs, traces: Option<Box<dyn Layer<Registry> + Send + Sync>>) {
    install(args, false, traces);
}

/// Logging with progress bars when stderr is a terminal (the trainer).
pub fn init_logging_with_progress(args: &LogArgs) -> ProgressOutput {
    if install(args, std::io::stderr().is_terminal(), None) {
        ProgressOutput::Bars
    } else {
        ProgressOutput::LogLines
    }
}

/// Sets the global subscriber; returns whether it draws progress bars.
fn install(args: &LogArgs, bars: bool, traces: Option<Box<dyn Layer<Registry> + Send + Sync>>) -> bool {
    let indicatif = bars.then(|| {
        IndicatifLayer::new().with_span_field_formatter(hide_indicatif_span_fields(DefaultFields::new()))
    });
    let writer = match &indicatif {
        Some(layer) => BoxMakeWriter::new(layer.get_stderr_writer()),
        None => BoxMakeWriter::new(std::io::stderr),
    };
    // Colour codes only for a terminal, not for log files.
    let fmt = tracing_subscriber::fmt::layer().with_writer(writer).with_ansi(std::io::stderr().is_terminal());
    let fmt: Box<dyn Layer<Registry> + Send + Sync> = match args.log_format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    // Checked by `parse_filter`. It filters log lines only, so that `--log-level warn` keeps the bar.
    let filter = EnvFilter::new(&args.log_level);
    let layers: Vec<_> = std::iter::once(fmt.with_filter(filter).boxed()).chain(traces).collect();
    let installed = tracing_subscriber::registry()
        .with(layers)
        .with(indicatif.map(|layer| layer.with_filter(IndicatifFilter::new(false))))
        .try_init()
        .is_ok();
    installed && bars
}
