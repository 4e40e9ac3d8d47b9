//! `cycleserve import`: PyTorch checkpoints in, cycleserve model file out.

use std::path::PathBuf;

use clap::Args;

use crate::model::{import, Domains, WeightStorage};

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// Generator checkpoint for X→Y (G): a state_dict as `.pth` or `.safetensors`, bare or
    /// wrapped (`state_dict`, `model`, `module.`).
    #[arg(long, required_unless_present = "checkpoint", conflicts_with = "checkpoint")]
    x2y: Option<PathBuf>,
    /// Generator checkpoint for Y→X (F); without it the model has one direction.
    #[arg(long, requires = "x2y")]
    y2x: Option<PathBuf>,
    /// One checkpoint holding both generators under two prefixes (`netG_A.`/`netG_B.`,
    /// `G_AB.`/`G_BA.`, `genA2B.`/`genB2A.`); the A→B one becomes x2y.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// With --checkpoint: take the B→A generator as x2y instead.
    #[arg(long, requires = "checkpoint")]
    swap: bool,
    /// Names of the two domains, X first: e.g. `photo,painting`.
    #[arg(long, value_parser = Domains::parse)]
    domains: Domains,
    /// Model file to write (.safetensors).
    #[arg(long)]
    out: PathBuf,
    /// How to store the weights: f32, f16, bf16, or int8 (convolution kernels with a scale per
    /// output channel, a quarter of f32's size). All are widened to f32 on load.
    #[arg(long, default_value = "f32")]
    storage: WeightStorage,
}

pub fn run(args: ImportArgs) -> anyhow::Result<()> {
    let report = match (&args.checkpoint, &args.x2y) {
        (Some(checkpoint), _) => {
            import::import_combined(checkpoint, args.swap, args.domains, &args.out, args.storage)?
        }
        (None, Some(x2y)) => import::import(x2y, args.y2x.as_deref(), args.domains, &args.out, args.storage)?,
        (None, None) => anyhow::bail!("give --x2y (and --y2x) or --checkpoint"),
    };
    for note in &report.notes {
        println!("note: {note}");
    }
    let directions: Vec<String> =
        report.directions.iter().map(|d| report.metadata.domains.direction_name(*d)).collect();
    println!(
        "wrote {}: {} ({}), {} parameters per generator",
        args.out.display(),
        directions.join(" + "),
        report.metadata.architecture,
        report.metadata.architecture.parameter_count()
    );
    Ok(())
}
