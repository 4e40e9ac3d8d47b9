//! The training recipe against PyTorch's 3-step trace in `tests/fixtures/golden/train_step`:
//! step-1 gradients of all four networks, per-step losses, and weights after 3 steps, from the
//! same initial weights and images (pool filling, no crop or flip: deterministic).

mod common;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use common::*;
use cycleserve::model::{DiscriminatorConfig, Family, GeneratorConfig};
use cycleserve::train::optim::AdamConfig;
use cycleserve::train::{TrainConfig, Trainer};

/// Per-tensor relative L2 bound for gradients, and the same for weights after 3 steps (Adam
/// normalises each update, so where a gradient is tiny its float noise moves the weight too;
/// seen here: up to 1.6e-5).
const GRAD_TOLERANCE: f64 = 1e-4;
const WEIGHT_TOLERANCE: f64 = 1e-4;
/// Relative error bound on each logged loss.
const LOSS_TOLERANCE: f64 = 1e-5;
/// Below this L2 norm a reference gradient is float noise around an exact zero.
const ZERO_GRADIENT: f64 = 1e-5;

fn norm(t: &Tensor) -> f64 {
    t.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt() as f64
}

fn golden_config() -> TrainConfig {
    let m = &manifest()["train_step"];
    let f = |k: &str| m[k].as_f64().unwrap();
    TrainConfig {
        x_dir: "unused".into(),
        y_dir: "unused".into(),
        dataset: None,
        generator: GeneratorConfig {
            family: m["upsample"].as_str().unwrap().parse::<Family>().unwrap(),
            ngf: f("ngf") as usize,
            n_blocks: f("n_blocks") as usize,
            norm_affine: false,
        },
        discriminator: DiscriminatorConfig { ndf: f("ndf") as usize },
        load_size: 32,
        crop_size: 32,
        flip: false,
        batch_size: 1,
        epochs: 1,
        epochs_decay: 0,
        adam: AdamConfig {
            lr: f("lr"),
            beta1: m["betas"][0].as_f64().unwrap(),
            beta2: m["betas"][1].as_f64().unwrap(),
            eps: 1e-8,
        },
        lambda_cycle: f("lambda_cycle"),
        lambda_identity: f("lambda_identity"),
        pool_size: 50,
        seed: 0,
        init_generators: None,
        average: None,
    }
}

fn golden_trainer() -> (Trainer, HashMap<String, Tensor>) {
    let golden = load_tensors(&golden("train_step.safetensors"));
    let trainer =
        Trainer::from_weights(golden_config(), &Device::Cpu, &strip_prefix(&golden, "init.")).unwrap();
    (trainer, golden)
}

#[test]
fn step_one_gradients_match_pytorch() {
    let (trainer, golden) = golden_trainer();
    let (x, y) = (&golden["real_x"], &golden["real_y"]);
    let g = trainer.nets.generator_losses(x, y, trainer.config.loss_weights()).unwrap();
    let g_grads = g.total.backward().unwrap();
    let (d_x, d_y) = trainer.nets.discriminator_losses(x, y, &g.fake_x.detach(), &g.fake_y.detach()).unwrap();
    let d_grads = (d_x + d_y).unwrap().backward().unwrap();

    let mut checked = 0;
    let mut worst = 0f64;
    for (name, var) in trainer.nets.sorted_vars() {
        let grads = if name.starts_with("D_") { &d_grads } else { &g_grads };
        let ours = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
        let theirs = &golden[&format!("grad.{name}")];
        let err = relative_l2(ours, theirs);
        // Biases feeding an instance norm have a true gradient of zero; compare absolutely.
        if norm(theirs) < ZERO_GRADIENT {
            // Biases feeding an instance norm: zero up to float32 round-off on both sides.
            let abs = ours.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(abs < 1e-5, "{name}: reference gradient is zero, ours reaches {abs:e}");
        } else {
            assert!(err < GRAD_TOLERANCE, "gradient of {name}: relative L2 {err:e}");
            worst = worst.max(err);
        }
        checked += 1;
    }
    let expected = golden.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(checked, expected, "every reference gradient is compared");
    println!("largest relative L2 over {checked} gradients: {worst:.2e}");
}

#[test]
fn three_steps_match_pytorch_losses_and_weights() {
    let (mut trainer, golden) = golden_trainer();
    let losses = manifest()["train_step"]["losses"].as_array().unwrap().clone();
    for (step, reference) in losses.iter().enumerate() {
        let ours = serde_json::to_value(trainer.step(&golden["real_x"], &golden["real_y"]).unwrap()).unwrap();
        for (name, value) in reference.as_object().unwrap() {
            if name == "step" {
                continue;
            }
            let (a, b) = (ours[name].as_f64().unwrap(), value.as_f64().unwrap());
            assert!((a - b).abs() <= LOSS_TOLERANCE * b.abs(), "step {step} {name}: ours {a}, PyTorch {b}");
        }
    }
    for (name, var) in trainer.nets.sorted_vars() {
        let err = relative_l2(var.as_tensor(), &golden[&format!("after3.{name}")]);
        let reference_grad = &golden[&format!("grad.{name}")];
        if norm(reference_grad) < ZERO_GRADIENT {
            // A bias feeding an instance norm cannot change the output: its true gradient is 0
            // and Adam turns float noise into steps of up to lr, differently in each library.
            // All that can be checked is that it moved no further than that.
            let moved = (var.as_tensor() - &golden[&format!("init.{name}")]).unwrap();
            let max = moved.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
            assert!(max <= 3.0 * trainer.config.adam.lr * 1.01, "{name} moved {max:e} in 3 steps");
        } else {
            assert!(err < WEIGHT_TOLERANCE, "{name} after 3 steps: relative L2 {err:e}");
        }
    }
}
