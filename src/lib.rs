//! cycleserve: CycleGAN style transfer as a service, on candle.
//!
//! - [`model`]: the networks, their model files and the PyTorch import;
//! - [`engine`]: admission under a memory budget, decoding, batching, inference and encoding;
//! - [`http`]: the axum service over the engine (routes, errors, metrics, the web page);
//! - [`memory`]: byte sizes, the default memory budget, and how freed buffers are returned;
//! - [`device`]: choosing the CPU or a CUDA device;
//! - [`train`]: CycleGAN training (`cycletrain`);
//! - [`cli`]: the `cycleserve` command line;
//! - [`logging`]: log lines (and the trainer's progress bars) for both binaries;
//! - [`telemetry`]: traces exported to an OpenTelemetry collector (`--otlp-endpoint`).

pub mod cli;
pub mod device;
pub mod engine;
pub mod http;
pub mod logging;
pub mod memory;
pub mod model;
pub mod telemetry;
pub mod train;
