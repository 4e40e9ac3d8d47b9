//! Finite-difference checks in f64 of the gradients training relies on: reflection padding,
//! instance norm (plain and affine, fused with its activation), the im2col + GEMM convolution
//! (odd sizes, strided) and the transposed upsampling built on it (k3 s2 p1 output_padding 1),
//! nearest upsampling, and whole small networks.

use candle_core::{DType, Device, Module, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use cycleserve::model::conv::{Conv2d, ConvConfig, ConvTranspose2d};
use cycleserve::model::instance_norm::{Activation, InstanceNorm};
use cycleserve::model::layers::{reflection_pad2d, upsample_nearest2x};
use cycleserve::model::{Discriminator, DiscriminatorConfig, Family, Generator, GeneratorConfig};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

const STEP: f64 = 1e-6;
/// Relative L2 between analytic and numeric gradients over the sampled entries. Central
/// differences in f64 carry ~1e-9 of round-off, which this leaves room for.
const TOLERANCE: f64 = 1e-5;
/// Floor of the norm the error is relative to: biases feeding an instance norm have a true
/// gradient of zero, where a purely relative error would compare round-off with round-off.
const NORM_FLOOR: f64 = 1e-2;
/// How many times its own measured round-off a numeric estimate may be off. A bias before an
/// instance norm has a true gradient of zero and its estimate is pure round-off, amplified by
/// |x + b| / σ of the norm: on the tiny generators' 2×3 bottleneck that reached 300 ε·|loss| / STEP
/// over 1,000 random draws, so no fixed allowance fits; the noise is measured instead.
const NOISE_FACTOR: f64 = 4.;
const SAMPLES: usize = 24;
/// Every test draws its inputs, weights, probe and sampled entries from this seed.
const SEED: u64 = 7;

/// Standard-normal values from the test's own seeded generator, so every run checks the same
/// points.
fn randn(rng: &mut StdRng, shape: &[usize]) -> Tensor {
    let values: Vec<f64> = (0..shape.iter().product()).map(|_| StandardNormal.sample(&mut *rng)).collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

/// Checks d loss / d var for each var at `SAMPLES` random entries, where
/// loss = Σ f() ⊙ probe for a fixed random probe.
///
/// Each entry is estimated by central differences at STEP and at 2·STEP. Their truncation errors
/// are ~1e-12 of the third derivative, so what separates them is round-off (which halves at the
/// larger step): their difference measures the estimate's noise, and the check allows
/// `NOISE_FACTOR` times it on top of `TOLERANCE`. A wrong gradient is off by far more than either.
fn gradcheck(rng: &mut StdRng, name: &str, vars: &[Var], f: impl Fn() -> Result<Tensor>) {
    let probe = randn(rng, f().unwrap().dims());
    let loss = || -> f64 { (f().unwrap() * &probe).unwrap().sum_all().unwrap().to_scalar().unwrap() };
    let grads = (f().unwrap() * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    let mut worst = 0f64;
    for (v, var) in vars.iter().enumerate() {
        let analytic = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient for var {v}"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let original = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let dims = var.as_tensor().dims().to_vec();
        let (mut diff, mut norm, mut noise) = (0f64, 0f64, 0f64);
        for _ in 0..SAMPLES.min(original.len()) {
            let i = rng.random_range(0..original.len());
            let at = |delta: f64| {
                let mut values = original.clone();
                values[i] += delta;
                var.set(&Tensor::from_vec(values, dims.as_slice(), &Device::Cpu).unwrap()).unwrap();
                loss()
            };
            let central = |step: f64| (at(step) - at(-step)) / (2. * step);
            let (numeric, coarse) = (central(STEP), central(2. * STEP));
            diff += (numeric - analytic[i]).powi(2);
            norm += numeric.powi(2);
            noise += (numeric - coarse).powi(2);
        }
        var.set(&Tensor::from_vec(original, dims.as_slice(), &Device::Cpu).unwrap()).unwrap();
        let scale = norm.sqrt().max(NORM_FLOOR);
        let (err, allowance) = (diff.sqrt() / scale, NOISE_FACTOR * noise.sqrt() / scale);
        assert!(
            err < TOLERANCE + allowance,
            "{name}, var {v}: relative gradient error {err:e} (measured round-off allows {allowance:e} over {TOLERANCE:e})"
        );
        worst = worst.max(err);
    }
    println!("{name}: largest gradient error {worst:.1e} over {} vars", vars.len());
}

#[test]
fn reflection_padding() {
    let mut rng = StdRng::seed_from_u64(SEED);
    let x = Var::from_tensor(&randn(&mut rng, &[2, 3, 5, 6])).unwrap();
    gradcheck(&mut rng, "reflection_pad2d", std::slice::from_ref(&x), || reflection_pad2d(&x, 3, 1, 2, 4));
}

#[test]
fn nearest_upsampling_whose_input_also_feeds_another_op() {
    let mut rng = StdRng::seed_from_u64(SEED);
    let x = Var::from_tensor(&randn(&mut rng, &[1, 2, 3, 4])).unwrap();
    // The sum with x's own square makes a second consumer of x.
    gradcheck(&mut rng, "upsample", std::slice::from_ref(&x), || {
        upsample_nearest2x(&x)?.sum_keepdim(3)?.sum_keepdim(2)?.broadcast_add(&x.sqr()?)
    });
}

#[test]
fn instance_norm_plain_and_affine() {
    let mut rng = StdRng::seed_from_u64(SEED);
    let x = Var::from_tensor(&randn(&mut rng, &[2, 3, 4, 5])).unwrap();
    let plain = InstanceNorm::new(3, false, VarBuilder::zeros(DType::F64, &Device::Cpu)).unwrap();
    gradcheck(&mut rng, "instance norm", std::slice::from_ref(&x), || plain.forward(&x));
    for activation in [Activation::Relu, Activation::LeakyRelu(0.2)] {
        gradcheck(&mut rng, &format!("instance norm + {activation:?}"), std::slice::from_ref(&x), || {
            plain.forward_then(&x, activation)
        });
    }

    let varmap = VarMap::new();
    let affine =
        InstanceNorm::new(3, true, VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu)).unwrap();
    let vars = randomize(&mut rng, &varmap);
    let mut all = vec![x.clone()];
    all.extend(vars);
    gradcheck(&mut rng, "affine instance norm + ReLU", &all, || affine.forward_then(&x, Activation::Relu));
}

#[test]
fn transposed_upsampling_with_output_padding() {
    let mut rng = StdRng::seed_from_u64(SEED);
    let x = Var::from_tensor(&randn(&mut rng, &[2, 4, 3, 5])).unwrap();
    let varmap = VarMap::new();
    let conv =
        ConvTranspose2d::new(4, 3, VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu)).unwrap();
    assert_eq!(conv.forward(&x).unwrap().dims(), &[2, 3, 6, 10]);
    let mut vars = vec![x.clone()];
    vars.extend(randomize(&mut rng, &varmap));
    gradcheck(&mut rng, "conv_transpose2d k3 s2 p1 op1", &vars, || conv.forward(&x));
}

#[test]
fn strided_convolution_on_odd_sizes() {
    let mut rng = StdRng::seed_from_u64(SEED);
    // candle's own conv2d backward gets the input-gradient shape wrong here; ours must not.
    let x = Var::from_tensor(&randn(&mut rng, &[2, 3, 9, 7])).unwrap();
    let varmap = VarMap::new();
    let config = ConvConfig { kernel: 3, stride: 2, padding: 1 };
    let conv = Conv2d::new(3, 4, config, VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu)).unwrap();
    let mut vars = vec![x.clone()];
    vars.extend(randomize(&mut rng, &varmap));
    gradcheck(&mut rng, "conv k3 s2 p1 on 9×7", &vars, || conv.forward(&x));
}

/// Fills every var with fresh N(0, 0.5) values (affine norms would otherwise start at 1 and 0)
/// and returns them in name order.
fn randomize(rng: &mut StdRng, varmap: &VarMap) -> Vec<Var> {
    let data = varmap.data().lock().unwrap();
    let mut names: Vec<_> = data.keys().cloned().collect();
    names.sort();
    names
        .iter()
        .map(|n| {
            let var = data[n].clone();
            var.set(&(randn(rng, var.as_tensor().dims()) * 0.5).unwrap()).unwrap();
            var
        })
        .collect()
}

fn check_generator(family: Family, norm_affine: bool) {
    let mut rng = StdRng::seed_from_u64(SEED);
    let varmap = VarMap::new();
    let cfg = GeneratorConfig { family, ngf: 2, n_blocks: 1, norm_affine };
    let g = Generator::new(cfg, VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu)).unwrap();
    let mut vars = vec![Var::from_tensor(&randn(&mut rng, &[1, 3, 8, 12])).unwrap()];
    vars.extend(randomize(&mut rng, &varmap));
    let x = vars[0].clone();
    gradcheck(&mut rng, &format!("{family} generator (affine {norm_affine})"), &vars, || g.forward(&x));
}

#[test]
fn whole_upsample_generator() {
    check_generator(Family::Upsample, false);
}

#[test]
fn whole_transpose_generator_with_affine_norm() {
    check_generator(Family::Transpose, true);
}

#[test]
fn whole_discriminator() {
    let mut rng = StdRng::seed_from_u64(SEED);
    let varmap = VarMap::new();
    let d = Discriminator::new(
        DiscriminatorConfig { ndf: 2 },
        VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu),
    )
    .unwrap();
    let mut vars = vec![Var::from_tensor(&randn(&mut rng, &[2, 3, 32, 48])).unwrap()];
    vars.extend(randomize(&mut rng, &varmap));
    let x = vars[0].clone();
    gradcheck(&mut rng, "discriminator", &vars, || d.forward(&x));
}
