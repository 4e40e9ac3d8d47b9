//! Throughput benchmarks (`cargo bench --bench bench -- <what> [options]`):
//!
//! - `network`: images/s through the bare network at several batch sizes;
//! - `engine`: end-to-end images/s through the engine (decode, queue, batch, network, encode)
//!   with 1, 4 and 16 concurrent callers, batching on and off, and the engine's overhead;
//! - `forward`: ms/image of one configuration, as JSON (used by `benches/cpu_compare.py`);
//! - `train`: cycletrain iterations/s of the default architecture at 128² and 256²;
//! - `conv3x3`: ms per f32 3×3 stride-1 forward and input gradient, im2col + GEMM against
//!   Winograd, for the shapes the training dispatch chooses between.
//!
//! Every number is measured in the same run as the numbers it is compared with.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use candle_core::{Device, Tensor};
use clap::{Parser, Subcommand};
use cycleserve::engine::catalog::load_model;
use cycleserve::engine::codec::OutputFormat;
use cycleserve::engine::observer::NoopObserver;
use cycleserve::engine::{Engine, EngineConfig};
use cycleserve::model::conv::{conv3x3_f32, Conv3x3Kernel};
use cycleserve::model::{Direction, Family, GeneratorConfig, Model};
use cycleserve::train::optim::AdamConfig;
use cycleserve::train::{TrainConfig, Trainer};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    what: What,
    /// cargo passes this to every bench target.
    #[arg(long, hide = true)]
    bench: bool,
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
        #[arg(long, value_delimiter = ',', default_value = "128,256")]
        sizes: Vec<usize>,
        #[arg(long, default_value_t = 5)]
        steps: usize,
        #[arg(long, default_value_t = 64)]
        ngf: usize,
        #[arg(long, default_value_t = 9)]
        blocks: usize,
    },
    Conv3x3 {
        /// `in:out:side:pad` per shape (square input plane of `side`, zero padding `pad`).
        #[arg(long, value_delimiter = ',', default_value = "256:256:34:0,128:64:128:1,256:128:64:1")]
        shapes: Vec<String>,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
}

fn main() -> anyhow::Result<()> {
    match Args::parse().what {
        What::Network { model, size, batches, images } => network(&model, size, &batches, images),
        What::Engine { model, image, callers, requests } => engine(&model, &image, &callers, requests),
        What::Forward { model, size, batch, iters, input, output } => {
            forward(&model, (size, batch, iters), input.as_deref(), output.as_deref())
        }
        What::Train { sizes, steps, ngf, blocks } => train(&sizes, steps, ngf, blocks),
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

fn network(model: &Path, size: usize, batches: &[usize], images: usize) -> anyhow::Result<()> {
    let model = Model::load(model, &Device::Cpu)?;
    let arch = model.metadata.architecture;
    println!("bare network, {arch:?}, {size}×{size}, {} threads", candle_core::utils::get_num_threads());
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

fn engine(model: &Path, image: &Path, callers: &[usize], requests: usize) -> anyhow::Result<()> {
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
    (size, batch, iters): (usize, usize, usize),
    given: Option<&Path>,
    output: Option<&Path>,
) -> anyhow::Result<()> {
    let model = Model::load(model, &Device::Cpu)?;
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

fn train(sizes: &[usize], steps: usize, ngf: usize, blocks: usize) -> anyhow::Result<()> {
    println!(
        "cycletrain step (G, F, D_X, D_Y updates), upsample ngf {ngf}, {blocks} blocks, ndf 64, batch 1, CPU"
    );
    println!("| crop | s/iteration | iterations/s |");
    println!("|---|---|---|");
    for &size in sizes {
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
        };
        let mut trainer = Trainer::new(config, &Device::Cpu)?;
        let (x, y) = (input(1, size)?, input(1, size)?);
        trainer.step(&x, &y)?;
        let started = Instant::now();
        for _ in 0..steps {
            trainer.step(&x, &y)?;
        }
        let seconds = started.elapsed().as_secs_f64() / steps as f64;
        println!("| {size}² | {seconds:.2} | {:.3} |", 1.0 / seconds);
    }
    Ok(())
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
        for (input_grad, a, name) in [(false, &x, "forward"), (true, &dy, "input grad")] {
            let time = |kernel| {
                best_of(rounds, || {
                    conv3x3_f32(kernel, input_grad, a, &weight, 1, (cin, cout), (side, side), pad)?;
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
