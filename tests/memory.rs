//! The executor's memory plan against what the process really touches: each measurement runs
//! in a fresh child process (the allocator keeps no freed memory from an earlier run) that
//! resets its peak RSS, runs one forward pass and reports how far the peak rose.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use cycleserve::model::fast::memory::forward_peak_bytes;
use cycleserve::model::fast::FastGenerator;
use cycleserve::model::{Family, GeneratorConfig};

const CHILD: &str = "CYCLESERVE_MEMORY_CHILD";

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn random_generator(config: GeneratorConfig) -> FastGenerator {
    let weights: HashMap<String, Tensor> = config
        .parameters()
        .into_iter()
        .map(|p| (p.name, Tensor::randn(0f32, 0.02, p.shape, &Device::Cpu).unwrap()))
        .collect();
    FastGenerator::new(config, &weights).unwrap()
}

/// In the child: the peak RSS growth of one forward pass, in bytes.
fn measure(config: GeneratorConfig, height: usize, width: usize) -> u64 {
    // As the server runs.
    cycleserve::memory::return_large_buffers_to_the_os();
    let generator = random_generator(config);
    // Start the thread pool and touch the code once, at a size too small to matter.
    generator.forward(&Tensor::zeros((1, 3, 8, 8), candle_core::DType::F32, &Device::Cpu).unwrap()).unwrap();
    std::fs::write("/proc/self/clear_refs", "5").expect("resetting the peak RSS needs Linux");
    let baseline = status_kib("VmRSS:");
    let input = Tensor::rand(-1f32, 1., (1, 3, height, width), &Device::Cpu).unwrap();
    let output = generator.forward(&input).unwrap();
    let peak = status_kib("VmHWM:");
    drop((input, output));
    (peak - baseline) * 1024
}

fn configs() -> [GeneratorConfig; 2] {
    [
        GeneratorConfig { family: Family::Upsample, ngf: 32, n_blocks: 6, norm_affine: false },
        GeneratorConfig { family: Family::Transpose, ngf: 64, n_blocks: 9, norm_affine: true },
    ]
}

const SIZES: [(usize, usize); 3] = [(256, 256), (384, 512), (16, 4096)];

#[test]
fn the_memory_plan_is_within_15_percent_of_the_measured_peak() {
    if let Ok(spec) = std::env::var(CHILD) {
        let v: Vec<usize> = spec.split(',').map(|x| x.parse().unwrap()).collect();
        println!("GROWTH {}", measure(configs()[v[0]], v[1], v[2]));
        return;
    }
    let threads = rayon::current_num_threads();
    for (index, config) in configs().into_iter().enumerate() {
        for (height, width) in SIZES {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "the_memory_plan_is_within_15_percent_of_the_measured_peak", "--nocapture"])
                .env(CHILD, format!("{index},{height},{width}"))
                .env("RAYON_NUM_THREADS", threads.to_string())
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            let measured: u64 = stdout
                .lines()
                .find_map(|l| l.strip_prefix("GROWTH "))
                .unwrap_or_else(|| panic!("child failed: {stdout}{}", String::from_utf8_lossy(&out.stderr)))
                .parse()
                .unwrap();
            let planned = forward_peak_bytes(&config, 1, height, width, threads);
            let error = planned as f64 / measured as f64 - 1.0;
            println!(
                "{config} at {width}×{height}: planned {:.1} MiB, measured {:.1} MiB ({:+.1} %)",
                planned as f64 / 1048576.0,
                measured as f64 / 1048576.0,
                100.0 * error
            );
            assert!(
                error.abs() <= 0.15,
                "{config:?} at {width}×{height}: plan off by {:.1} %",
                100.0 * error
            );
        }
    }
}
