//! The CycleGAN networks, their model files and the PyTorch import.
//!
//! - [`config`]: the architectures and the PyTorch parameter names and shapes they imply;
//! - [`generator`], [`discriminator`]: the networks as candle modules (inference and training),
//!   built from [`layers`] (reflection padding, upsampling), [`instance_norm`] (fused with its
//!   activation, forward and backward) and [`conv`] (the
//!   convolutions, with an im2col + GEMM CPU path in both directions, and `winograd_train`'s
//!   F(4×4, 3×3) for the 3×3 stride-1 forward, input gradient and weight gradient in f32);
//! - [`fast`]: a channels-last CPU executor for the generator, inference only;
//! - [`gemm`]: the safe matrix product that [`conv`] and [`fast`] share; [`scratch`]: the work
//!   buffers the training kernels reuse between calls;
//! - [`file`](mod@file): the safetensors model file, its weights stored as [`stored_weights`]
//!   says; [`import`]: PyTorch `.pth` checkpoints into it;
//! - here: [`Model`], a loaded file with a ready generator per direction, and [`ModelError`].

pub mod amx;
pub mod checkpoint;
pub mod config;
pub mod conv;
pub mod discriminator;
pub mod fast;
pub mod file;
pub mod gemm;
pub mod generator;
pub mod import;
pub mod instance_norm;
pub mod layers;
pub mod layout;
pub mod pickle;
pub mod pixels;
pub mod scratch;
mod storage;
pub mod stored_weights;
mod winograd_train;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

pub use config::{DiscriminatorConfig, Family, GeneratorConfig};
pub use discriminator::Discriminator;
pub use file::{Direction, Domains, ModelFile, ModelMetadata};
pub use generator::Generator;
pub use stored_weights::WeightStorage;

/// Everything that can be wrong with a model file or a checkpoint to import.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    // The inner errors are shown in the message itself rather than chained as `source`, so
    // that `to_string()` (what HTTP bodies and logs carry) is complete on its own.
    #[error("cannot read {path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: {error}")]
    InFile { path: PathBuf, error: Box<ModelError> },
    #[error("not a safetensors file ({reason})")]
    NotSafetensors { reason: String },
    #[error("truncated model file: {reason}")]
    Truncated { reason: String },
    #[error(
        "the header metadata lacks {keys}: a cycleserve model file names its architecture \
         (family, ngf, n_blocks, norm_affine) and domains (domain_x, domain_y) there; \
         `cycleserve import` converts PyTorch checkpoints"
    )]
    MissingMetadata { keys: String },
    #[error("unknown family `{0}` in the header metadata: expected `upsample` or `transpose`")]
    UnknownFamily(String),
    #[error("header metadata `{key}` is `{value}`, expected {expected}")]
    BadMetadata { key: String, value: String, expected: String },
    #[error("no generator weights: expected tensors named G.* (x2y) and/or F.* (y2x)")]
    NoGenerators,
    #[error("tensors do not match the architecture ({architecture}): {}", summarize(problems))]
    TensorMismatch { architecture: String, problems: Vec<String> },
    #[error("tensor {tensor} is {dtype}; weights must be F32, F16, BF16 or I8 with F32/F16/BF16 scales")]
    UnsupportedDtype { tensor: String, dtype: String },
    #[error("tensor {tensor} holds a scale that is not a finite number")]
    NonFiniteScale { tensor: String },
    #[error("cannot map checkpoint {path}: {reason}")]
    Import { path: PathBuf, reason: String },
    #[error("cannot write {path}: {reason}")]
    Write { path: PathBuf, reason: String },
    #[error("this model has no {direction} ({name}) generator")]
    MissingDirection { direction: Direction, name: String },
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    /// Adds the file name to an error found inside a file.
    pub(crate) fn in_file(self, path: &Path) -> Self {
        match self {
            Self::Io { .. } | Self::InFile { .. } => self,
            other => Self::InFile { path: path.to_path_buf(), error: Box::new(other) },
        }
    }
}

/// Lists problems; a file of the wrong architecture can have hundreds, so the tail is counted.
fn summarize(problems: &[String]) -> String {
    const SHOWN: usize = 12;
    let mut text = problems.iter().take(SHOWN).cloned().collect::<Vec<_>>().join("; ");
    if problems.len() > SHOWN {
        text.push_str(&format!("; and {} more", problems.len() - SHOWN));
    }
    text
}

/// What runs a loaded generator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Executor {
    /// candle's ops, on any device (the reference, and what training uses).
    Candle,
    /// The channels-last Winograd executor of [`fast`], CPU only, in f32.
    FastCpu,
    /// [`fast`]'s executor on AMX tiles: bf16 convolution inputs and weights, f32 sums and
    /// everything else in f32. Holds the proof that this CPU has AMX.
    FastCpuBf16(amx::Amx),
}

/// The arithmetic of the CPU executor, as asked for on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    /// bf16 on CPUs with AMX, f32 on others.
    Auto,
    F32,
    /// bf16 convolutions on AMX tiles (an error on CPUs without AMX).
    Bf16,
}

impl Executor {
    /// The f32 fast executor on the CPU, candle elsewhere.
    pub fn for_device(device: &Device) -> Self {
        if device.is_cpu() {
            Self::FastCpu
        } else {
            Self::Candle
        }
    }

    /// The executor for `device` in `precision`: bf16 only on a CPU with AMX, and precision
    /// means nothing to candle on a GPU (it runs f32).
    pub fn choose(device: &Device, precision: Precision) -> Result<Self, ModelError> {
        if !device.is_cpu() {
            return match precision {
                Precision::Bf16 => Err(ModelError::Unsupported(
                    "--precision bf16 runs on the CPU's AMX tiles; on a GPU the networks run in f32".into(),
                )),
                Precision::Auto | Precision::F32 => Ok(Self::Candle),
            };
        }
        match (precision, amx::Amx::detect()) {
            (Precision::F32, _) | (Precision::Auto, None) => Ok(Self::FastCpu),
            (_, Some(amx)) => Ok(Self::FastCpuBf16(amx)),
            (Precision::Bf16, None) => Err(ModelError::Unsupported(
                "--precision bf16 needs a CPU with AMX-BF16 (Intel Sapphire Rapids or later); this one has none".into(),
            )),
        }
    }

    /// The arithmetic it runs convolutions in, as reported to clients.
    pub fn precision_name(&self) -> &'static str {
        match self {
            Self::Candle | Self::FastCpu => "f32",
            Self::FastCpuBf16(_) => "bf16",
        }
    }
}

#[derive(Debug)]
enum Network {
    Candle(Box<Generator>),
    FastCpu(Box<fast::FastGenerator>),
    FastCpuBf16(Box<fast::AmxGenerator>),
}

/// A loaded model: its metadata and a ready generator for each direction it has.
#[derive(Debug)]
pub struct Model {
    pub metadata: ModelMetadata,
    generators: BTreeMap<Direction, Network>,
}

impl Model {
    pub fn load(path: &Path, device: &Device) -> Result<Self, ModelError> {
        Self::from_file(ModelFile::load(path, device)?, device)
    }

    pub fn load_with(path: &Path, device: &Device, executor: Executor) -> Result<Self, ModelError> {
        Self::from_file_with(ModelFile::load(path, device)?, device, executor)
    }

    /// Builds each generator with the best executor for `device`.
    pub fn from_file(file: ModelFile, device: &Device) -> Result<Self, ModelError> {
        Self::from_file_with(file, device, Executor::for_device(device))
    }

    pub fn from_file_with(file: ModelFile, device: &Device, executor: Executor) -> Result<Self, ModelError> {
        let config = file.metadata.architecture;
        let mut generators = BTreeMap::new();
        for (direction, weights) in file.generators {
            let network = match executor {
                Executor::Candle => {
                    let vb = VarBuilder::from_tensors(weights, DType::F32, device);
                    Network::Candle(Box::new(Generator::new(config, vb)?))
                }
                Executor::FastCpu if device.is_cpu() => {
                    Network::FastCpu(Box::new(fast::FastGenerator::new(config, &weights)?))
                }
                Executor::FastCpuBf16(amx) if device.is_cpu() => {
                    Network::FastCpuBf16(Box::new(fast::AmxGenerator::new(amx, config, &weights)?))
                }
                Executor::FastCpu | Executor::FastCpuBf16(_) => {
                    return Err(
                        candle_core::Error::Msg("the fast executor runs on the CPU only".into()).into()
                    )
                }
            };
            generators.insert(direction, network);
        }
        Ok(Self { metadata: file.metadata, generators })
    }

    pub fn directions(&self) -> impl Iterator<Item = Direction> + '_ {
        self.generators.keys().copied()
    }

    /// Checks that the model has this direction.
    pub fn ensure_direction(&self, direction: Direction) -> Result<(), ModelError> {
        self.network(direction).map(|_| ())
    }

    fn network(&self, direction: Direction) -> Result<&Network, ModelError> {
        self.generators.get(&direction).ok_or_else(|| ModelError::MissingDirection {
            direction,
            name: self.metadata.domains.direction_name(direction),
        })
    }

    /// Runs one direction on an NCHW batch in [-1, 1].
    pub fn forward(&self, direction: Direction, x: &Tensor) -> Result<Tensor, ModelError> {
        Ok(match self.network(direction)? {
            Network::Candle(g) => g.forward(x)?,
            Network::FastCpu(g) => g.forward(x)?,
            Network::FastCpuBf16(g) => g.forward(x)?,
        })
    }
}
