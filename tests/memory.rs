//! The executors' memory plans against what the process really touches: each measurement runs
//! in a fresh child process (the allocator keeps no freed memory from an earlier run) that
//! resets its peak RSS, runs one forward pass and reports how far the peak rose. The AMX
//! executor is measured where the CPU has AMX.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use cycleserve::model::amx::Amx;
use cycleserve::model::fast::memory::{forward_peak_bytes, forward_peak_bytes_amx};
use cycleserve::model::fast::{AmxGenerator, FastGenerator};
use cycleserve::model::{Family, GeneratorConfig};

const CHILD: &str = "CYCLESERVE_MEMORY_CHILD";

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A generator with random weights, run by the f32 executor or (`amx`) the bf16 one.
fn random_generator(config: GeneratorConfig, amx: bool) -> Box<dyn Fn(&Tensor) -> Tensor> {
    let weights: HashMap<String, Tensor> = config
        .parameters()
        .into_iter()
        .map(|p| (p.name, Tensor::randn(0f32, 0.02, p.shape, &Device::Cpu).unwrap()))
        .collect();
    if amx {
        let generator = AmxGenerator::new(Amx::detect().unwrap(), config, &weights).unwrap();
        Box::new(move |x| generator.forward(x).unwrap())
    } else {
        let generator = FastGenerator::new(config, &weights).unwrap();
        Box::new(move |x| generator.forward(x).unwrap())
    }
}

/// In the child: the peak RSS growth of one forward pass, in bytes.
fn measure(config: GeneratorConfig, amx: bool, height: usize, width: usize) -> u64 {
    // As the server runs.
    cycleserve::memory::return_large_buffers_to_the_os();
    let generator = random_generator(config, amx);
    // Start the thread pool and touch the code once, at a size too small to matter.
    generator(&Tensor::zeros((1, 3, 8, 8), candle_core::DType::F32, &Device::Cpu).unwrap());
    std::fs::write("/proc/self/clear_refs", "5").expect("resetting the peak RSS needs Linux");
    let baseline = status_kib("VmRSS:");
    let input = Tensor::rand(-1f32, 1., (1, 3, height, width), &Device::Cpu).unwrap();
    let output = generator(&input);
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
        println!("GROWTH {}", measure(configs()[v[0]], v[1] == 1, v[2], v[3]));
        return;
    }
    let threads = rayon::current_num_threads();
    let executors: &[bool] = if Amx::detect().is_some() { &[false, true] } else { &[false] };
    for (index, config) in configs().into_iter().enumerate() {
        for (&amx, (height, width)) in executors.iter().flat_map(|e| SIZES.iter().map(move |s| (e, *s))) {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "the_memory_plan_is_within_15_percent_of_the_measured_peak", "--nocapture"])
                .env(CHILD, format!("{index},{},{height},{width}", u8::from(amx)))
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
            let plan = if amx { forward_peak_bytes_amx } else { forward_peak_bytes };
            let planned = plan(&config, 1, height, width, threads);
            let error = planned as f64 / measured as f64 - 1.0;
            let precision = if amx { "bf16" } else { "f32" };
            println!(
                "{config} {precision} at {width}×{height}: planned {:.1} MiB, measured {:.1} MiB ({:+.1} %)",
                planned as f64 / 1048576.0,
                measured as f64 / 1048576.0,
                100.0 * error
            );
            assert!(
                error.abs() <= 0.15,
                "{config:?} {precision} at {width}×{height}: plan off by {:.1} %",
                100.0 * error
            );
        }
    }
}
