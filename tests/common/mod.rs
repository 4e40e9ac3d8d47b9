//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

/// Runs one of the crate's binaries with quiet logs.
pub fn run_binary(exe: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(exe).args(args).env("CYCLESERVE_LOG_LEVEL", "warn").output().unwrap()
}

pub fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

pub fn golden(name: &str) -> PathBuf {
    fixture("golden").join(name)
}

pub fn manifest() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(golden("manifest.json")).unwrap()).unwrap()
}

/// All tensors of a safetensors fixture, on the CPU.
pub fn load_tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// ‖a − b‖₂ / ‖b‖₂, computed in f64.
pub fn relative_l2(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let diff = (a - &b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
    let norm = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
    (diff / norm).sqrt()
}

/// The tensors whose names start with `prefix`, with the prefix removed.
pub fn strip_prefix(tensors: &HashMap<String, Tensor>, prefix: &str) -> HashMap<String, Tensor> {
    tensors.iter().filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k.to_string(), v.clone()))).collect()
}

pub mod server;

/// Which directions [`import_golden`] writes.
pub enum Directions {
    X2yOnly,
    /// The same weights each way.
    Both,
}

/// Imports the golden upsample generator's `.pth` into a `photo,painting` model file at `out`.
pub fn import_golden(out: &Path, directions: Directions) {
    let pth = golden("generator_upsample.pth");
    let y2x = matches!(directions, Directions::Both).then_some(pth.as_path());
    let domains = cycleserve::model::Domains::parse("photo,painting").unwrap();
    cycleserve::model::import::import(&pth, y2x, domains, out, cycleserve::model::WeightStorage::F32)
        .unwrap();
}

/// A folder holding the golden upsample generator (both directions) as model `tiny`.
pub fn tiny_models_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    import_golden(&dir.path().join("tiny.safetensors"), Directions::Both);
    dir
}

/// Share of channel values of two images within ±1 level, and the largest difference.
pub fn agreement(a: &Path, b: &Path) -> (f64, u8) {
    let a = image::open(a).unwrap().to_rgb8();
    let b = image::open(b).unwrap().to_rgb8();
    assert_eq!(a.dimensions(), b.dimensions());
    let diffs: Vec<u8> = a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| x.abs_diff(*y)).collect();
    let close = diffs.iter().filter(|d| **d <= 1).count();
    (close as f64 / diffs.len() as f64, *diffs.iter().max().unwrap())
}

/// `cycleserve translate` of the odd-sized photo fixture with `model` on the CPU, in f32 (what
/// the PyTorch references are compared with), into `result`.
pub fn translate_photo(model: &Path, direction: &str, result: &Path) -> std::process::Output {
    translate_photo_in(model, direction, "f32", result)
}

/// [`translate_photo`] in `precision` (`f32`, `bf16` or `auto`).
pub fn translate_photo_in(
    model: &Path,
    direction: &str,
    precision: &str,
    result: &Path,
) -> std::process::Output {
    let photo = fixture("photo_250x198.png");
    let args = ["translate", "--model", model.to_str().unwrap(), "--direction", direction, "--device", "cpu"];
    let args = [&args[..], &["--precision", precision]].concat();
    let mut args = args.to_vec();
    args.extend([photo.to_str().unwrap(), result.to_str().unwrap()]);
    run_binary(env!("CARGO_BIN_EXE_cycleserve"), &args)
}
