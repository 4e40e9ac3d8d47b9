//! cycleserve: CycleGAN style transfer as a service, on candle.
//!
//! - [`model`]: the networks, their model files and the PyTorch import;
//! - [`engine`]: decoding, batching, inference and encoding;
//! - [`train`]: CycleGAN training (`cycletrain`);
//! - [`cli`]: the `cycleserve` command line.

pub mod cli;
pub mod device;
pub mod engine;
pub mod http;
pub mod memory;
pub mod model;
pub mod train;
