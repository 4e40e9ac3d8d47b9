//! `cycleserve translate`: one image through the same pipeline the server uses.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::device::DeviceSpec;
use crate::engine::{self, codec};
use crate::model::Model;

#[derive(Debug, Args)]
pub struct TranslateArgs {
    /// Model file (.safetensors) to translate with; the shipped photo ↔ painting model by default.
    #[arg(long, env = "CYCLESERVE_MODEL", default_value = "models/photo2painting.safetensors")]
    model: PathBuf,
    /// `x2y`, `y2x`, or the domain-named form such as `photo2painting`.
    #[arg(long, default_value = "x2y")]
    direction: String,
    /// Where to run: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", env = "CYCLESERVE_DEVICE")]
    device: DeviceSpec,
    /// Largest input accepted, in pixels (width × height).
    #[arg(long, default_value_t = codec::DecodeOptions::default().max_pixels)]
    max_pixels: u64,
    /// Image to translate (PNG, JPEG, WebP, BMP, GIF, TIFF).
    input: PathBuf,
    /// Where to write the result, as PNG.
    output: PathBuf,
}

pub fn run(args: TranslateArgs) -> anyhow::Result<()> {
    let device = args.device.open()?;
    let model = Model::load(&args.model, &device)?;
    let direction = model.metadata.domains.parse_direction(&args.direction).map_err(anyhow::Error::msg)?;
    model.ensure_direction(direction)?;
    let bytes =
        std::fs::read(&args.input).with_context(|| format!("cannot read {}", args.input.display()))?;
    let limits = codec::DecodeOptions { max_bytes: usize::MAX, max_pixels: args.max_pixels, max_side: None };
    let image = codec::decode(&bytes, &limits).with_context(|| args.input.display().to_string())?;
    let started = std::time::Instant::now();
    let result = engine::run_batch(&model, direction, &[&image], &device)?.remove(0);
    let elapsed = started.elapsed();
    let png = codec::encode(&result, codec::OutputFormat::Png)?;
    std::fs::write(&args.output, png).with_context(|| format!("cannot write {}", args.output.display()))?;
    tracing::info!(
        direction = %model.metadata.domains.direction_name(direction),
        width = image.width(),
        height = image.height(),
        seconds = elapsed.as_secs_f64(),
        output = %args.output.display(),
        "translated"
    );
    Ok(())
}
