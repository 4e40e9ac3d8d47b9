//! `cycleserve import`: PyTorch checkpoints in, cycleserve model file out.

use std::path::PathBuf;

use clap::Args;

use crate::model::{import, Domains};

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// Generator checkpoint for X→Y (G), as saved by PyTorch-GAN or the original CycleGAN code.
    #[arg(long)]
    x2y: PathBuf,
    /// Generator checkpoint for Y→X (F); without it the model has one direction.
    #[arg(long)]
    y2x: Option<PathBuf>,
    /// Names of the two domains, X first: e.g. `photo,painting`.
    #[arg(long, value_parser = Domains::parse)]
    domains: Domains,
    /// Model file to write (.safetensors).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: ImportArgs) -> anyhow::Result<()> {
    let report = import::import(&args.x2y, args.y2x.as_deref(), args.domains, &args.out)?;
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
