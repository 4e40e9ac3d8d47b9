//! Parity with the PyTorch reference in `tests/fixtures/golden` (copied from the project's
//! shared golden vectors): generators of both families, affine and not, batch 2, non-square
//! inputs, and the discriminator, all within relative L2 1e-5 in f32.

mod common;

use candle_core::{DType, Device, Module};
use candle_nn::VarBuilder;
use common::*;
use cycleserve::model::fast::FastGenerator;
use cycleserve::model::import::read_checkpoint;
use cycleserve::model::{Discriminator, DiscriminatorConfig, Family, Generator, GeneratorConfig};

const TOLERANCE: f64 = 1e-5;

fn manifest_config(name: &str) -> GeneratorConfig {
    let m = &manifest()[name];
    GeneratorConfig {
        family: m["upsample"].as_str().unwrap().parse::<Family>().unwrap(),
        ngf: m["ngf"].as_u64().unwrap() as usize,
        n_blocks: m["n_blocks"].as_u64().unwrap() as usize,
        norm_affine: m["instance_norm_affine"].as_bool().unwrap(),
    }
}

fn check_generator(name: &str) {
    let tensors = load_tensors(&golden(&format!("{name}.safetensors")));
    let config = manifest_config(name);
    let weights =
        tensors.iter().filter(|(k, _)| k.starts_with("model.")).map(|(k, v)| (k.clone(), v.clone()));
    let vb = VarBuilder::from_tensors(weights.collect(), DType::F32, &Device::Cpu);
    let generator = Generator::new(config, vb).unwrap();
    let imported = read_checkpoint(&golden(&format!("{name}.pth"))).unwrap();
    assert_eq!(imported.config, config, "{name}.pth imports to a different architecture");
    let fast = FastGenerator::new(config, &imported.weights).unwrap();
    let from_pth =
        Generator::new(config, VarBuilder::from_tensors(imported.weights, DType::F32, &Device::Cpu)).unwrap();

    let cases = manifest()[name]["cases"].as_u64().unwrap();
    for case in 0..cases {
        let input = &tensors[&format!("input.{case}")];
        let expected = &tensors[&format!("output.{case}")];
        let err = relative_l2(&generator.forward(input).unwrap(), expected);
        assert!(err < TOLERANCE, "{name} case {case} {:?}: relative L2 {err:e}", input.dims());
        let err_pth = relative_l2(&from_pth.forward(input).unwrap(), expected);
        assert!(err_pth < TOLERANCE, "{name}.pth case {case}: relative L2 {err_pth:e}");
        let err_fast = relative_l2(&fast.forward(input).unwrap(), expected);
        assert!(err_fast < TOLERANCE, "{name} case {case}, fast CPU executor: relative L2 {err_fast:e}");
        println!(
            "{name} case {case} {:?}: relative L2 {err:.2e} (candle), {err_fast:.2e} (fast)",
            input.dims()
        );
    }
}

#[test]
fn upsample_generator_matches_pytorch() {
    check_generator("generator_upsample");
}

#[test]
fn transpose_generator_matches_pytorch() {
    check_generator("generator_transpose");
}

#[test]
fn affine_transpose_generator_matches_pytorch() {
    check_generator("generator_transpose_affine");
}

#[test]
fn discriminator_matches_pytorch() {
    let tensors = load_tensors(&golden("discriminator.safetensors"));
    let ndf = manifest()["discriminator"]["ndf"].as_u64().unwrap() as usize;
    let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, &Device::Cpu);
    let d = Discriminator::new(DiscriminatorConfig { ndf }, vb).unwrap();
    let out = d.forward(&tensors["input.0"]).unwrap();
    let err = relative_l2(&out, &tensors["output.0"]);
    assert!(err < TOLERANCE, "discriminator: relative L2 {err:e}");
    println!("discriminator: relative L2 {err:.2e}");
}
