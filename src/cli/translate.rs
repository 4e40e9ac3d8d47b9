//! `cycleserve translate`: images through the same numeric path the server uses, without a
//! server. `translate IN OUT` translates one file; `translate --out-dir DIR PATH…` translates
//! files and the images in folders, batching images of the same size, with decoding and
//! encoding on their own threads. Either way each result is byte for byte what translating its
//! image alone gives.
//!
//! - [`inputs`]: which files are read and where each result goes (and which runs are refused);
//! - [`batcher`]: groups decoded images by the size the network runs them at;
//! - [`pipeline`]: the decode and encode threads, the network between them, the failures.

mod batcher;
mod inputs;
mod pipeline;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use candle_core::Device;
use clap::Args;
use image::DynamicImage;
use tracing_indicatif::span_ext::IndicatifSpanExt;

use crate::device::DeviceSpec;
use crate::engine::codec::{self, DecodedImage, OutputFormat};
use crate::engine::footprint::MemoryModel;
use crate::engine::run_batch;
use crate::logging::ProgressOutput;
use crate::memory::{self, parse_bytes};
use crate::model::{Direction, Executor, Model, Precision};
use inputs::Plan;
use pipeline::{Network, Report, Settings};

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
    /// The CPU's arithmetic: bf16 convolutions on AMX tiles, or f32; auto takes bf16 where the
    /// CPU has AMX.
    #[arg(long, env = "CYCLESERVE_PRECISION", value_enum, default_value = "auto")]
    precision: Precision,
    /// Largest input accepted, in pixels (width × height).
    #[arg(long, default_value_t = codec::DecodeOptions::default().max_pixels)]
    max_pixels: u64,
    /// Folder to write the results into (created if missing), each named after its input with
    /// the format's extension: `a.jpg` becomes `a.png`. Needed for several inputs or a folder.
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,
    /// Format of the results.
    #[arg(long, value_enum, default_value = "png")]
    format: OutputFormat,
    /// Most images of one size that go through the network together.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..))]
    batch_size: u16,
    /// Memory one batch's network pass may use (e.g. `2GiB`); batches of large images are made
    /// smaller to fit. Default: as the server's, 80 % of the cgroup limit or 50 % of memory.
    #[arg(long, env = "CYCLESERVE_MEMORY_BUDGET", value_parser = parse_bytes)]
    memory_budget: Option<u64>,
    /// With --out-dir: images (PNG, JPEG, WebP, BMP, GIF, TIFF) and folders, whose image files
    /// are translated (subfolders are not entered). Without: `INPUT OUTPUT`, one image and the
    /// file its result is written to.
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
}

pub fn run(args: TranslateArgs, progress: ProgressOutput) -> anyhow::Result<()> {
    // Usage mistakes are refused before the model is loaded.
    let plan = inputs::plan(&args.paths, args.out_dir.as_deref(), args.format)?;
    if plan.jobs.is_empty() && plan.unlisted.is_empty() {
        tracing::warn!("no image files in the folders given");
    }
    let (device, executor, model, direction) = load(&args)?;
    let budget = match args.memory_budget {
        Some(bytes) => bytes,
        None => memory::default_budget()?,
    };
    let mut network = ModelNetwork::new(&model, direction, (&device, executor), budget);
    let settings = Settings {
        decode: codec::DecodeOptions { max_bytes: usize::MAX, max_pixels: args.max_pixels, max_side: None },
        format: args.format,
        batch_size: args.batch_size.into(),
        threads: std::thread::available_parallelism().map_or(2, |n| n.get()).min(4),
    };

    let bar = Bar::new(progress, plan.jobs.len());
    let started = Instant::now();
    let report = pipeline::run(&plan.jobs, &settings, &mut network, &|ok| bar.done(ok));
    drop(bar);
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        direction = %model.metadata.domains.direction_name(direction),
        images = plan.jobs.len() + plan.unlisted.len(),
        written = report.written,
        failed = report.failures.len() + plan.unlisted.len(),
        batches = report.batches,
        seconds,
        images_per_second = report.written as f64 / seconds,
        "translated"
    );
    outcome(plan, report)
}

/// The device and executor, the model on them, and the direction asked for.
fn load(args: &TranslateArgs) -> anyhow::Result<(Device, Executor, Model, Direction)> {
    let device = args.device.open()?;
    let executor = Executor::choose(&device, args.precision)?;
    let model = Model::load_with(&args.model, &device, executor)?;
    let direction = model.metadata.domains.parse_direction(&args.direction).map_err(anyhow::Error::msg)?;
    model.ensure_direction(direction)?;
    Ok((device, executor, model, direction))
}

/// Ok when every input was translated; otherwise an error listing each failure.
fn outcome(plan: Plan, report: Report) -> anyhow::Result<()> {
    let inputs = plan.jobs.len() + plan.unlisted.len();
    let failures: Vec<_> = plan.unlisted.into_iter().chain(report.failures).collect();
    if failures.is_empty() {
        return Ok(());
    }
    let lines: Vec<String> =
        failures.iter().map(|f| format!("{}: {}", f.input.display(), f.reason)).collect();
    match plan.out_dir {
        // The single-file form: one line, as it always was.
        None => anyhow::bail!("{}", lines.join("\n")),
        Some(dir) => anyhow::bail!(
            "{} of {inputs} inputs could not be translated ({} written to {}):\n  {}",
            failures.len(),
            report.written,
            dir.display(),
            lines.join("\n  ")
        ),
    }
}

/// The progress bar of a run of several images, drawn on a terminal only.
struct Bar {
    /// The span that owns the bar; dropping it removes the bar.
    span: Option<tracing::Span>,
    failed: AtomicUsize,
}

impl Bar {
    fn new(output: ProgressOutput, jobs: usize) -> Self {
        let span = (output == ProgressOutput::Bars && jobs > 1).then(|| {
            let span = tracing::info_span!("translate", indicatif.pb_show = tracing::field::Empty);
            let style = indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} images {per_sec} ETA {eta} {msg}",
            )
            .expect("valid progress template")
            .progress_chars("=> ");
            span.pb_set_style(&style);
            span.pb_set_length(jobs as u64);
            span.pb_start();
            span
        });
        Self { span, failed: AtomicUsize::new(0) }
    }

    /// One image finished, written (`ok`) or failed.
    fn done(&self, ok: bool) {
        let Some(span) = &self.span else { return };
        span.pb_inc(1);
        if !ok {
            let failed = self.failed.fetch_add(1, Ordering::Relaxed) + 1;
            span.pb_set_message(&format!("{failed} failed"));
        }
    }
}

/// The loaded model on its device, with batches capped by the memory a pass may use.
struct ModelNetwork<'a> {
    model: &'a Model,
    direction: Direction,
    device: &'a Device,
    memory: MemoryModel,
    budget: u64,
}

impl<'a> ModelNetwork<'a> {
    fn new(
        model: &'a Model,
        direction: Direction,
        (device, executor): (&'a Device, Executor),
        budget: u64,
    ) -> Self {
        let memory = MemoryModel {
            architecture: model.metadata.architecture,
            executor,
            threads: rayon::current_num_threads(),
        };
        Self { model, direction, device, memory, budget }
    }
}

impl Network for ModelNetwork<'_> {
    fn run(&mut self, images: &[&DecodedImage]) -> Result<Vec<DynamicImage>, String> {
        run_batch(self.model, self.direction, images, self.device).map_err(|e| e.to_string())
    }

    fn batch_limit(&self, (width, height): (u32, u32), most: usize) -> usize {
        // Memory grows with the batch: stop before the first size over the budget.
        let fits = |n: &usize| self.memory.network_bytes(*n, width, height) <= self.budget;
        (2..=most).take_while(fits).last().unwrap_or(1)
    }
}
