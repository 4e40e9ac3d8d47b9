//! Throughput benchmarks (`cargo bench --bench bench -- <what> [options]`):
//!
//! - `network`: images/s through the bare network at several batch sizes;
//! - `engine`: end-to-end images/s through the engine (decode, queue, batch, network, encode)
//!   with 1, 4 and 16 concurrent callers, batching on and off, and the engine's overhead;
//! - `forward`: ms/image of one configuration, as JSON (used by `benches/cpu_compare.py`);
//! - `train`: cycletrain s/iteration (median) of the default architecture at 128² and 256²;
//!   from given weights and images with `--weights`/`--inputs`, and as JSON with every step's
//!   losses and the peak RSS with `--json` (used by `benches/train_compare.py`).
//! - `conv3x3`: ms per f32 3×3 stride-1 forward, input gradient and weight gradient, im2col +
//!   GEMM (as the layers run it) against Winograd, for the shapes the training dispatch chooses
//!   between.
//!
//! Every number is measured in the same run as the numbers it is compared with.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use candle_core::{Device, Tensor};
use clap::{Parser, Subcommand};
use cycleserve::engine::catalog::load_model;
use cycleserve::engine::codec::OutputFormat;
use cycleserve::engine::observer::NoopObserver;
use cycleserve::engine::{Engine, EngineConfig};
use cycleserve::model::conv::{conv3x3_f32, Conv3x3Kernel, Conv3x3Product};
use cycleserve::model::{Direction, Executor, Family, GeneratorConfig, Model, Precision};
use cycleserve::train::optim::AdamConfig;
use cycleserve::train::{TrainConfig, Trainer};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    what: What,
    /// cargo passes this to every bench target, after the subcommand's own arguments.
    #[arg(long, hide = true, global = true)]
    bench: bool,
    /// The CPU executor's arithmetic for `network`, `engine` and `forward`.
    #[arg(long, global = true, value_enum, default_value = "f32")]
    precision: Precision,
}

#[derive(Subcommand)]
enum What {
    Network {
        #[arg(long, default_value = "models/photo2painting.safetensors")]
        model: PathBuf,
        #[arg(long, default_value_t = 256)]
        size: usize,
        #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
        batches: Vec<usize>,
        /// Images per measurement (at least one batch).
        #[arg(long, default_value_t = 16)]
        images: usize,
    },
    Engine {
        #[arg(long, default_value = "models/photo2painting.safetensors")]
        model: PathBuf,
        #[arg(long, default_value = "tests/fixtures/photo_256x256.png")]
        image: PathBuf,
        #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
        callers: Vec<usize>,
        #[arg(long, default_value_t = 32)]
        requests: usize,
    },
    Forward {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value_t = 256)]
        size: usize,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long, default_value_t = 3)]
        iters: usize,
        /// Run on this NCHW f32 .npy batch (its shape overrides size and batch) instead of noise.
        #[arg(long)]
        input: Option<PathBuf>,
        /// Write the last output here as .npy (to compare runtimes).
        #[arg(long)]
        output: Option<PathBuf>,
    },
    Train {
        /// Crop sizes, each trained from fresh weights on noise.
        #[arg(long, value_delimiter = ',', default_value = "128,256", conflicts_with = "inputs")]
        sizes: Vec<usize>,
        /// Timed steps per crop, after one warm-up step.
        #[arg(long, default_value_t = 5)]
        steps: usize,
        #[arg(long, default_value_t = 64)]
        ngf: usize,
        #[arg(long, default_value_t = 9)]
        blocks: usize,
        /// Start from these weights (safetensors named `G.model.1.weight`, `D_X.model.0.bias`…)
        /// instead of the seeded initialisation.
        #[arg(long)]
        weights: Option<PathBuf>,
        /// Train on these two 1×3×S×S f32 .npy images, X then Y (their size is the crop).
        #[arg(long, num_args = 2, value_names = ["X", "Y"])]
        inputs: Option<Vec<PathBuf>>,
        /// Print one JSON line per crop: median s/iteration, every step's seconds and losses
        /// (the warm-up first), and the process's peak RSS so far.
        #[arg(long)]
        json: bool,
    },
    Conv3x3 {
        /// `in:out:side:pad` per shape (square input plane of `side`, zero padding `pad`).
        #[arg(long, value_delimiter = ',', default_value = "256:256:34:0,128:64:128:1,256:128:64:1")]
        shapes: Vec<String>,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
}

/// What `train` runs on besides the architecture.
struct TrainSetup {
    weights: Option<PathBuf>,
    inputs: Option<Vec<PathBuf>>,
    json: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let executor = Executor::choose(&Device::Cpu, args.precision)?;
    match args.what {
        What::Network { model, size, batches, images } => network(&model, executor, size, &batches, images),
        What::Engine { model, image, callers, requests } => {
            engine(&model, executor, &image, &callers, requests)
        }
        What::Forward { model, size, batch, iters, input, output } => {
            forward(&model, executor, (size, batch, iters), input.as_deref(), output.as_deref())
        }
        What::Train { sizes, steps, ngf, blocks, weights, inputs, json } => {
            train(&sizes, (steps, ngf, blocks), TrainSetup { weights, inputs, json })
        }
        What::Conv3x3 { shapes, rounds } => conv3x3(&shapes, rounds),
    }
}

/// Seconds per call of `f`, the best of `rounds` after one warm-up call.
fn best_of(rounds: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..rounds {
        let started = Instant::now();
        f()?;
        best = best.min(started.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn input(batch: usize, size: usize) -> anyhow::Result<Tensor> {
    Ok(Tensor::rand(-1f32, 1., (batch, 3, size, size), &Device::Cpu)?)
}

fn network(
    model: &Path,
    executor: Executor,
    size: usize,
    batches: &[usize],
    images: usize,
) -> anyhow::Result<()> {
    let model = Model::load_with(model, &Device::Cpu, executor)?;
    let arch = model.metadata.architecture;
    println!(
        "bare network, {arch:?}, {size}×{size}, {}, {} threads",
        executor.precision_name(),
        candle_core::utils::get_num_threads()
    );
    println!("| batch | ms/batch | ms/image | images/s |");
    println!("|---|---|---|---|");
    for &batch in batches {
        let x = input(batch, size)?;
        let reps = images.div_ceil(batch).max(1);
        let seconds = best_of(2, || {
            for _ in 0..reps {
                model.forward(Direction::XtoY, &x)?;
            }
            Ok(())
        })? / reps as f64;
        println!(
            "| {batch} | {:.1} | {:.1} | {:.2} |",
            seconds * 1e3,
            seconds * 1e3 / batch as f64,
            batch as f64 / seconds
        );
    }
    Ok(())
}

fn engine(
    model: &Path,
    executor: Executor,
    image: &Path,
    callers: &[usize],
    requests: usize,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let bytes = Bytes::from(std::fs::read(image)?);
    println!("engine end to end, {}, {requests} requests per row", image.display());
    println!("| batching | callers | images/s | mean batch | decode ms | queue ms | network ms/batch | encode ms |");
    println!("|---|---|---|---|---|---|---|---|");
    for (label, max_batch_size) in [("off", 1), ("on (≤8, 5 ms)", 8)] {
        let config = EngineConfig {
            max_batch_size,
            max_batch_delay: Duration::from_millis(5),
            queue_capacity: 1024,
            ..Default::default()
        };
        let engine = Arc::new(Engine::new(
            vec![load_model(model)?],
            vec![Device::Cpu],
            executor,
            config,
            Arc::new(NoopObserver),
        ));
        while !engine.is_ready() {
            std::thread::sleep(Duration::from_millis(10));
        }
        let target = engine.resolve(None, "x2y")?;
        for &n in callers {
            let started = Instant::now();
            let timings = runtime.block_on(async {
                let mut tasks = Vec::new();
                for caller in 0..n {
                    let (engine, bytes, target) = (Arc::clone(&engine), bytes.clone(), target.clone());
                    let share = requests / n + usize::from(caller < requests % n);
                    tasks.push(tokio::spawn(async move {
                        let mut done = Vec::new();
                        for _ in 0..share {
                            let ticket = engine.admit(bytes.len() as u64)?;
                            done.push(
                                engine
                                    .translate(ticket, target.clone(), bytes.clone(), OutputFormat::Png)
                                    .await?,
                            );
                        }
                        anyhow::Ok(done)
                    }));
                }
                let mut all = Vec::new();
                for task in tasks {
                    all.extend(task.await??);
                }
                anyhow::Ok(all)
            })?;
            let seconds = started.elapsed().as_secs_f64();
            let mean = |f: &dyn Fn(&cycleserve::engine::Translation) -> f64| {
                timings.iter().map(f).sum::<f64>() / timings.len() as f64
            };
            println!(
                "| {label} | {n} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} |",
                timings.len() as f64 / seconds,
                mean(&|t| t.batch_size as f64),
                mean(&|t| t.timings.decode.as_secs_f64() * 1e3),
                mean(&|t| t.timings.queue.as_secs_f64() * 1e3),
                mean(&|t| t.timings.inference.as_secs_f64() * 1e3),
                mean(&|t| t.timings.encode.as_secs_f64() * 1e3),
            );
        }
        runtime.block_on(engine.shutdown());
    }
    Ok(())
}

fn forward(
    model: &Path,
    executor: Executor,
    (size, batch, iters): (usize, usize, usize),
    given: Option<&Path>,
    output: Option<&Path>,
) -> anyhow::Result<()> {
    let model = Model::load_with(model, &Device::Cpu, executor)?;
    let x = match given {
        Some(path) => Tensor::read_npy(path)?,
        None => input(batch, size)?,
    };
    let (batch, _, size, _) = x.dims4()?;
    let seconds = best_of(iters, || Ok(model.forward(Direction::XtoY, &x).map(|_| ())?))?;
    if let Some(path) = output {
        model.forward(Direction::XtoY, &x)?.write_npy(path)?;
    }
    println!(
        "{}",
        serde_json::json!({ "ms_per_image": seconds * 1e3 / batch as f64, "size": size, "batch": batch })
    );
    Ok(())
}

fn train(
    sizes: &[usize],
    (steps, ngf, blocks): (usize, usize, usize),
    setup: TrainSetup,
) -> anyhow::Result<()> {
    // As cycletrain does, before the first candle op.
    cycleserve::train::keep_candle_elementwise_on_one_thread();
    cycleserve::memory::keep_freed_buffers_for_reuse();
    anyhow::ensure!(steps > 0, "--steps must be at least 1");
    let given = match &setup.inputs {
        Some(paths) => Some((Tensor::read_npy(&paths[0])?, Tensor::read_npy(&paths[1])?)),
        None => None,
    };
    let sizes = match &given {
        Some((x, y)) => {
            let (n, c, h, w) = x.dims4()?;
            anyhow::ensure!(
                (n, c) == (1, 3) && h == w && x.dims() == y.dims(),
                "--inputs must be two 1×3×S×S images of one size, got {:?} and {:?}",
                x.dims(),
                y.dims()
            );
            vec![h]
        }
        None => sizes.to_vec(),
    };
    let weights = match &setup.weights {
        Some(path) => Some((path, candle_core::safetensors::load(path, &Device::Cpu)?)),
        None => None,
    };
    if !setup.json {
        println!(
            "cycletrain step (G, F, D_X, D_Y updates), upsample ngf {ngf}, {blocks} blocks, ndf 64, batch 1, CPU"
        );
        println!("| crop | s/iteration (median of {steps}) | iterations/s |");
        println!("|---|---|---|");
    }
    for size in sizes {
        let config = TrainConfig {
            x_dir: "unused".into(),
            y_dir: "unused".into(),
            dataset: None,
            generator: GeneratorConfig {
                family: Family::Upsample,
                ngf,
                n_blocks: blocks,
                norm_affine: false,
            },
            discriminator: cycleserve::model::DiscriminatorConfig { ndf: 64 },
            load_size: size as u32,
            crop_size: size as u32,
            flip: false,
            batch_size: 1,
            epochs: 1,
            epochs_decay: 0,
            adam: AdamConfig { lr: 2e-4, beta1: 0.5, beta2: 0.999, eps: 1e-8 },
            lambda_cycle: 10.0,
            lambda_identity: 0.5,
            pool_size: 50,
            seed: 0,
            init_generators: None,
            average: None,
        };
        let mut trainer = match &weights {
            Some((path, weights)) => {
                Trainer::from_weights(config, &Device::Cpu, weights).with_context(|| {
                    format!("{} does not fit upsample ngf {ngf}, {blocks} blocks, ndf 64", path.display())
                })?
            }
            None => Trainer::new(config, &Device::Cpu)?,
        };
        let (x, y) = match &given {
            Some((x, y)) => (x.clone(), y.clone()),
            None => (input(1, size)?, input(1, size)?),
        };
        let mut seconds = Vec::with_capacity(steps + 1);
        let mut losses = Vec::with_capacity(steps + 1);
        for _ in 0..=steps {
            let started = Instant::now();
            losses.push(trainer.step(&x, &y)?);
            seconds.push(started.elapsed().as_secs_f64());
        }
        let median = median(&seconds[1..]);
        if setup.json {
            println!(
                "{}",
                serde_json::json!({
                    "size": size,
                    "s_per_iteration": median,
                    "step_seconds": seconds,
                    "losses": losses,
                    "peak_rss_kib": peak_rss_kib(),
                })
            );
        } else {
            println!("| {size}² | {median:.2} | {:.3} |", 1.0 / median);
        }
    }
    Ok(())
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 0 {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    }
}

/// The process's peak resident memory (VmHWM), where /proc reports it.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn conv3x3(shapes: &[String], rounds: usize) -> anyhow::Result<()> {
    println!(
        "f32 3×3 stride-1 products, batch 1, best of {rounds}, {} threads",
        rayon::current_num_threads()
    );
    println!("| in→out | input | pad | product | im2col+GEMM ms | Winograd ms | speed-up |");
    println!("|---|---|---|---|---|---|---|");
    for shape in shapes {
        let fields: Vec<usize> = shape.split(':').map(str::parse).collect::<Result<_, _>>()?;
        let &[cin, cout, side, pad] = fields.as_slice() else {
            anyhow::bail!("shape {shape:?}: expected in:out:side:pad")
        };
        let out_side = side + 2 * pad - 2;
        let random = |len: usize| -> anyhow::Result<Vec<f32>> {
            Ok(Tensor::rand(-1f32, 1., len, &Device::Cpu)?.to_vec1()?)
        };
        let weight = random(cout * cin * 9)?;
        let x = random(cin * side * side)?;
        let dy = random(cout * out_side * out_side)?;
        for (product, a, b, name) in [
            (Conv3x3Product::Forward, &x, &weight, "forward"),
            (Conv3x3Product::InputGrad, &dy, &weight, "input grad"),
            (Conv3x3Product::WeightGrad, &x, &dy, "weight grad"),
        ] {
            let time = |kernel| {
                best_of(rounds, || {
                    conv3x3_f32(kernel, product, a, b, 1, (cin, cout), (side, side), pad)?;
                    Ok(())
                })
            };
            let (gemm, winograd) = (time(Conv3x3Kernel::Im2colGemm)?, time(Conv3x3Kernel::Winograd)?);
            println!(
                "| {cin}→{cout} | {side}² | {pad} | {name} | {:.2} | {:.2} | {:.2}× |",
                gemm * 1e3,
                winograd * 1e3,
                gemm / winograd
            );
        }
    }
    Ok(())
}
