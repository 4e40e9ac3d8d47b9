//! cycleserve: CycleGAN style transfer as a service, on candle.
//!
//! - [`model`]: the networks, their model files and the PyTorch import;
//! - [`engine`]: decoding, batching, inference and encoding;
//! - [`train`]: CycleGAN training (`cycletrain`);
//! - [`cli`]: the `cycleserve` command line;
//! - [`logging`]: log lines (and the trainer's progress bars) for both binaries.

pub mod cli;
pub mod device;
pub mod engine;
pub mod http;
pub mod logging;
pub mod model;
pub mod train;
