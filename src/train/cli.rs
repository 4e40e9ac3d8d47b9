//! The `cycletrain` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

use super::average::AverageConfig;
use super::config::GeneratorInit;
use super::data::Dataset;
use super::eval::{write_grid, EvalSet};
use super::export::{export, ExportOptions};
use super::interrupt::StopRequest;
use super::lock::RunLock;
use super::optim::AdamConfig;
use super::provenance::dataset_label;
use super::run::{checkpoint_path, run, HeldOutEval, RunOptions};
use super::trainer::GeneratorWeights;
use super::{TrainConfig, Trainer};
use crate::device::DeviceSpec;
use crate::engine::catalog::load_model;
use crate::logging::{init_logging_with_progress, LogArgs, ProgressOutput};
use crate::model::{
    Direction, DiscriminatorConfig, Domains, Family, GeneratorConfig, Model, ModelFile, WeightStorage,
};
use candle_core::{Device, Tensor};

/// The original CycleGAN recipe's 100 epochs at the initial rate, then 100 of decay.
const DEFAULT_EPOCHS: usize = 100;

#[derive(Debug, Parser)]
#[command(
    name = "cycletrain",
    version,
    about = "Train CycleGAN generators on two folders of unpaired images",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    train: TrainArgs,
    #[command(flatten)]
    logging: LogArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write the serving model file (G and F) from a run directory or checkpoint.
    Export(ExportArgs),
    /// Measure a model file on held-out images: mean L1 cycle and identity errors (JSON), and
    /// optionally a sample grid.
    Eval(EvalArgs),
}

#[derive(Debug, Args)]
struct EvalArgs {
    /// Model file to evaluate (both directions).
    model: PathBuf,
    /// Held-out domain-X images.
    #[arg(long)]
    x: PathBuf,
    /// Held-out domain-Y images.
    #[arg(long)]
    y: PathBuf,
    /// Also write a grid: rows of x, G(x), F(G(x)), y, F(y), G(F(y)).
    #[arg(long)]
    grid: Option<PathBuf>,
    /// Rows of the grid.
    #[arg(long, default_value_t = 4)]
    grid_rows: usize,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: DeviceSpec,
}

#[derive(Debug, Args)]
struct TrainArgs {
    /// Dataset folder holding trainA/ (domain X) and trainB/ (domain Y).
    #[arg(long, conflicts_with_all = ["x", "y"])]
    data: Option<PathBuf>,
    /// Folder of domain-X images (instead of --data).
    #[arg(long, requires = "y")]
    x: Option<PathBuf>,
    /// Folder of domain-Y images (instead of --data).
    #[arg(long, requires = "x")]
    y: Option<PathBuf>,
    /// What exported models say they were trained on (e.g. flower2cnpainting); also renames the
    /// data of a resumed run [default: the image folders relative to the run directory].
    #[arg(long)]
    dataset_name: Option<String>,
    /// Run directory: checkpoint.safetensors, samples/, losses.jsonl, losses.png.
    #[arg(long, required_unless_present = "resume")]
    out: Option<PathBuf>,
    /// Continue the run in this directory exactly where its checkpoint left it. Data,
    /// architecture and recipe come from the checkpoint and the options below them are
    /// ignored, except --epochs and --epochs-decay, which replace the run's schedule, and
    /// --average-decay, which starts an average in a run that keeps none.
    #[arg(long, conflicts_with = "out")]
    resume: Option<PathBuf>,

    /// Stop after this many steps in total (the schedule still spans all epochs).
    #[arg(long)]
    max_steps: Option<u64>,
    /// Checkpoint every N steps (and at the end of every epoch).
    #[arg(long, default_value_t = 1000)]
    save_every: u64,
    /// Write a sample grid every N steps.
    #[arg(long, default_value_t = 500)]
    sample_every: u64,
    /// Threads loading and augmenting images ahead of the training loop.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Held-out domain-X images to evaluate on (mean L1 cycle and identity errors).
    #[arg(long, requires = "eval_y")]
    eval_x: Option<PathBuf>,
    /// Held-out domain-Y images to evaluate on.
    #[arg(long, requires = "eval_x")]
    eval_y: Option<PathBuf>,
    /// Evaluate every N steps (and at the end) into eval.jsonl.
    #[arg(long, default_value_t = 1000)]
    eval_every: u64,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: DeviceSpec,

    /// Resize images to this square size before cropping.
    #[arg(long, default_value_t = 286)]
    load_size: u32,
    /// Random square crop the networks train on.
    #[arg(long, default_value_t = 256)]
    crop_size: u32,
    /// Disable random horizontal flips.
    #[arg(long)]
    no_flip: bool,
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    /// Epochs at the initial learning rate [default: 100].
    #[arg(long)]
    epochs: Option<usize>,
    /// Epochs of linear decay to 0 after those [default: 100].
    #[arg(long)]
    epochs_decay: Option<usize>,
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    #[arg(long, default_value_t = 0.5)]
    beta1: f64,
    #[arg(long, default_value_t = 0.999)]
    beta2: f64,
    #[arg(long, default_value_t = 10.0)]
    lambda_cycle: f64,
    /// Identity loss weight, as a fraction of --lambda-cycle (0 disables it).
    #[arg(long, default_value_t = 0.5)]
    lambda_identity: f64,
    /// Past fakes kept per domain for the discriminators.
    #[arg(long, default_value_t = 50)]
    pool_size: usize,
    /// Generator family: upsample (nearest + conv) or transpose (ConvTranspose2d).
    #[arg(long, default_value = "upsample")]
    family: Family,
    /// Generator filters in the first layer.
    #[arg(long, default_value_t = 64)]
    ngf: usize,
    /// Residual blocks in the generator.
    #[arg(long, default_value_t = 9)]
    blocks: usize,
    /// Discriminator filters in the first layer.
    #[arg(long, default_value_t = 64)]
    ndf: usize,
    /// Seeds initialisation, data order, augmentation and the image pools.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Start G and F from this model file's weights instead of the seed's random ones (the
    /// discriminators, optimiser moments and image pools start fresh). Its architecture must be
    /// the one --family, --ngf and --blocks ask for; its name and SHA-256 go into the recipe.
    #[arg(long, conflicts_with = "resume")]
    init_generators: Option<PathBuf>,
    /// Keep a moving average of G and F, `average ← decay · average + (1 − decay) · weights` after
    /// every step, for export to take instead of the last step's weights (e.g. 0.999: about the
    /// last thousand steps). On --resume it starts from the checkpoint's weights.
    #[arg(long, value_parser = parse_average_decay)]
    average_decay: Option<f64>,
}

#[derive(Debug, Args)]
struct ExportArgs {
    /// Run directory or checkpoint file.
    source: PathBuf,
    /// Model file to write.
    #[arg(long)]
    out: PathBuf,
    /// Domain names, X first: e.g. photo,painting.
    #[arg(long, value_parser = Domains::parse)]
    domains: Domains,
    /// How to store the weights: f32, f16 or bf16 (half the size), or int8 (a quarter: int8
    /// convolution kernels with a scale per output channel). All are widened to f32 on load.
    #[arg(long, default_value = "f32")]
    storage: WeightStorage,
    /// Name the training data in the model file [default: what the run recorded].
    #[arg(long)]
    dataset_name: Option<String>,
    /// The generators' weights to write: the last step's, or the run's moving average
    /// [default: average if the run keeps one, else last].
    #[arg(long, value_enum)]
    weights: Option<GeneratorWeights>,
}

pub fn main() -> ExitCode {
    super::keep_candle_elementwise_on_one_thread();
    crate::memory::keep_freed_buffers_for_reuse();
    let cli = Cli::parse();
    let progress = init_logging_with_progress(&cli.logging);
    let result = match cli.command {
        Some(Command::Export(args)) => run_export(args),
        Some(Command::Eval(args)) => run_eval(args),
        None => train(cli.train, progress),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_export(args: ExportArgs) -> anyhow::Result<()> {
    let options =
        ExportOptions { storage: args.storage, weights: args.weights, dataset_name: args.dataset_name };
    let meta = export(&args.source, &args.out, args.domains, options)?;
    println!(
        "wrote {} ({} steps, {} weights, {})",
        args.out.display(),
        meta.provenance["steps"],
        meta.provenance["weights"],
        meta.architecture
    );
    Ok(())
}

fn run_eval(args: EvalArgs) -> anyhow::Result<()> {
    let device = args.device.open()?;
    let model = Model::load(&args.model, &device)?;
    let set = EvalSet::load(&args.x, &args.y, &device)?;
    let g =
        |x: &Tensor| model.forward(Direction::XtoY, x).map_err(|e| candle_core::Error::Msg(e.to_string()));
    let f =
        |x: &Tensor| model.forward(Direction::YtoX, x).map_err(|e| candle_core::Error::Msg(e.to_string()));
    let steps = model.metadata.steps().unwrap_or(0);
    println!("{}", serde_json::to_string(&set.evaluate(&g, &f, steps)?)?);
    if let Some(path) = &args.grid {
        write_grid(&set, &g, &f, args.grid_rows, 256, path)?;
    }
    Ok(())
}

fn train(args: TrainArgs, progress: ProgressOutput) -> anyhow::Result<()> {
    let device = args.device.open()?;
    let Setup { run_dir, lock: _lock, trainer, dataset } = match &args.resume {
        Some(dir) => resume_run(dir, &args, &device)?,
        None => new_run(&args, &device)?,
    };
    let eval = match (&args.eval_x, &args.eval_y) {
        (Some(x), Some(y)) => {
            Some(HeldOutEval { set: EvalSet::load(x, y, &device)?, every: args.eval_every.max(1) })
        }
        _ => None,
    };
    let options = RunOptions {
        out_dir: run_dir,
        save_every: args.save_every.max(1),
        sample_every: args.sample_every.max(1),
        max_steps: args.max_steps,
        workers: args.workers,
        eval,
        stop: StopRequest::on_signals().context("cannot install the SIGINT/SIGTERM handlers")?,
        progress,
    };
    run(trainer, Arc::new(dataset), &options)
}

/// A run ready to train, its directory locked.
struct Setup {
    run_dir: PathBuf,
    lock: RunLock,
    trainer: Trainer,
    dataset: Dataset,
}

fn resume_run(dir: &Path, args: &TrainArgs, device: &Device) -> anyhow::Result<Setup> {
    if !dir.is_dir() {
        bail!("cannot read checkpoint {}: no such run directory", checkpoint_path(dir).display());
    }
    // Before the checkpoint is read, so that it is not one that a running run will replace.
    let lock = RunLock::acquire(dir)?;
    let mut trainer = Trainer::resume(&checkpoint_path(dir), device)?;
    if args.epochs.is_some() || args.epochs_decay.is_some() {
        let epochs = args.epochs.unwrap_or(trainer.config.epochs);
        let decay = args.epochs_decay.unwrap_or(trainer.config.epochs_decay);
        trainer.reschedule(epochs, decay)?;
    }
    if let Some(name) = &args.dataset_name {
        trainer.config.dataset = Some(name.clone());
    }
    if let Some(decay) = args.average_decay {
        trainer.start_average(decay)?;
    }
    let dataset = open_dataset(&trainer.config)?;
    Ok(Setup { run_dir: dir.to_path_buf(), lock, trainer, dataset })
}

fn new_run(args: &TrainArgs, device: &Device) -> anyhow::Result<Setup> {
    let run_dir = args.out.clone().context("--out is required")?;
    let mut config = config_from_args(args)?;
    // The starting weights and the data are checked before the run directory is made.
    let start = match &args.init_generators {
        Some(path) => Some(read_generators(path, &config.generator)?),
        None => None,
    };
    let dataset = open_dataset(&config)?;
    std::fs::create_dir_all(&run_dir).with_context(|| format!("cannot create {}", run_dir.display()))?;
    let lock = RunLock::acquire(&run_dir)?;
    config.dataset = Some(match &args.dataset_name {
        Some(name) => name.clone(),
        None => dataset_label(&config.x_dir, &config.y_dir, &run_dir),
    });
    config.init_generators = start.as_ref().map(|(init, _)| init.clone());
    let mut trainer = Trainer::new(config, device)?;
    if let Some((_, file)) = &start {
        trainer.nets.load_network("G", &file.generators[&Direction::XtoY])?;
        trainer.nets.load_network("F", &file.generators[&Direction::YtoX])?;
    }
    // From the weights the run starts with, the file's or the seed's.
    if let Some(decay) = args.average_decay {
        trainer.start_average(decay)?;
    }
    Ok(Setup { trainer, run_dir, lock, dataset })
}

/// The model file `--init-generators` names, checked to hold both generators of `architecture`.
fn read_generators(
    path: &Path,
    architecture: &GeneratorConfig,
) -> anyhow::Result<(GeneratorInit, ModelFile)> {
    let (info, file) =
        load_model(path).context("--init-generators: cannot start the generators from this file")?;
    let held = info.metadata.architecture;
    if held.norm_affine != architecture.norm_affine {
        bail!("{} holds {held} generators; cycletrain trains non-affine instance norm only", path.display());
    }
    if held != *architecture {
        bail!(
            "{} holds {held} generators; this run asks for {architecture} (set --family, --ngf and \
             --blocks to match)",
            path.display()
        );
    }
    let domains = &info.metadata.domains;
    if let [only] = info.directions[..] {
        bail!(
            "{} holds only the {} generator; a run needs both G and F",
            path.display(),
            domains.direction_name(only)
        );
    }
    // The file's X must be the run's X: nothing in the images says which domain they are.
    tracing::info!(
        file = %path.display(),
        g = %domains.direction_name(Direction::XtoY),
        f = %domains.direction_name(Direction::YtoX),
        "the generators start from a model file: the run's X images must be its {}s",
        domains.x
    );
    let init = GeneratorInit {
        file: path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        sha256: info.sha256,
        steps: info.metadata.steps(),
    };
    Ok((init, file))
}

fn parse_average_decay(text: &str) -> Result<f64, String> {
    let decay: f64 = text.parse().map_err(|e| format!("{e}"))?;
    AverageConfig::new(decay, 0).map(|_| decay).map_err(|e| e.to_string())
}

fn open_dataset(config: &TrainConfig) -> anyhow::Result<Dataset> {
    Dataset::open(&config.x_dir, &config.y_dir, config.load_size, config.crop_size, config.flip, config.seed)
}

/// A fresh run's config, its dataset not yet named.
fn config_from_args(args: &TrainArgs) -> anyhow::Result<TrainConfig> {
    let (x_dir, y_dir) = match (&args.data, &args.x, &args.y) {
        (Some(data), None, None) => (data.join("trainA"), data.join("trainB")),
        (None, Some(x), Some(y)) => (x.clone(), y.clone()),
        _ => bail!("give the images as --data DIR (with trainA/ and trainB/) or as --x DIR --y DIR"),
    };
    if args.batch_size == 0 || args.ngf == 0 || args.ndf == 0 {
        bail!("--batch-size, --ngf and --ndf must be positive");
    }
    Ok(TrainConfig {
        x_dir,
        y_dir,
        dataset: None,
        generator: GeneratorConfig {
            family: args.family,
            ngf: args.ngf,
            n_blocks: args.blocks,
            norm_affine: false,
        },
        discriminator: DiscriminatorConfig { ndf: args.ndf },
        load_size: args.load_size,
        crop_size: args.crop_size,
        flip: !args.no_flip,
        batch_size: args.batch_size,
        epochs: args.epochs.unwrap_or(DEFAULT_EPOCHS),
        epochs_decay: args.epochs_decay.unwrap_or(DEFAULT_EPOCHS),
        adam: AdamConfig { lr: args.lr, beta1: args.beta1, beta2: args.beta2, eps: 1e-8 },
        lambda_cycle: args.lambda_cycle,
        lambda_identity: args.lambda_identity,
        pool_size: args.pool_size,
        seed: args.seed,
        init_generators: None,
        average: None,
    })
}
