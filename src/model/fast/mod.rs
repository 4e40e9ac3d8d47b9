//! A CPU inference executor for the generator, built from the same weights as
//! [`crate::model::Generator`] and checked against it.
//!
//! candle's ops are general: every op allocates, runs channels-first, and re-reads memory. This
//! executor keeps activations channels-last, so convolution patches are contiguous; packs and
//! transforms the weights once at load time; runs every 3×3 stride-1 convolution (residual
//! blocks, and the upsampling convolutions after a nearest ×2) by Winograd F(4×4, 3×3), which
//! needs a quarter of the multiplications; splits the stride-2 transposed convolution into four
//! sub-pixel convolutions; and fuses instance norm with its ReLU or residual add. It has no
//! backward pass: training uses the candle networks.
//!
//! - `nhwc`: the channels-last activations, padding, upsampling and fused instance norm;
//! - `gemm_conv`: convolutions as GEMMs over patches (7×7, strided, transposed phases);
//! - `winograd`: the 3×3 stride-1 convolutions;
//! - here: [`FastGenerator`], which packs a generator's weights and runs its layers in order.

mod amx_conv;
mod amx_generator;
mod gemm_conv;
pub mod memory;
mod nhwc;
pub(crate) mod winograd;

use std::collections::HashMap;

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::config::{Family, GeneratorConfig, GeneratorLayer};
pub use amx_generator::AmxGenerator;
use gemm_conv::GemmConv;
use nhwc::{instance_norm, pad, upsample2x_zero_pad1, After, Border, Nhwc};
use winograd::WinogradConv;

/// Affine instance-norm parameters (scale, shift), when the model has them.
type NormParams = Option<(Vec<f32>, Vec<f32>)>;

#[derive(Clone, Debug)]
enum Upsampling {
    /// Nearest ×2, then a 3×3 convolution.
    Nearest(WinogradConv),
    /// ConvTranspose2d(k3, s2, p1, op1) as four phases: (row parity, column parity, conv).
    Transposed(Vec<(usize, usize, GemmConv)>),
}

#[derive(Clone, Debug)]
pub struct FastGenerator {
    stem: (GemmConv, NormParams),
    down: [(GemmConv, NormParams); 2],
    blocks: Vec<[(WinogradConv, NormParams); 2]>,
    up: [(Upsampling, NormParams); 2],
    head: GemmConv,
}

impl FastGenerator {
    /// Builds the executor from PyTorch-named weights (as a model file holds them).
    pub fn new(config: GeneratorConfig, weights: &HashMap<String, Tensor>) -> Result<Self> {
        let source = LayerSource { config, weights };
        let winograd = |layer: GeneratorLayer| -> Result<WinogradConv> {
            let (cin, cout) = config.channels(layer);
            Ok(WinogradConv::new(&source.weight(layer)?, &source.bias(layer)?, cout, cin))
        };
        let blocks = (0..config.n_blocks)
            .map(|block| -> Result<_> {
                let layer = |conv| GeneratorLayer::Block { block, conv };
                Ok([
                    (winograd(layer(0))?, source.norm(layer(0))?),
                    (winograd(layer(1))?, source.norm(layer(1))?),
                ])
            })
            .collect::<Result<Vec<_>>>()?;
        let up_stage = |stage: usize| -> Result<(Upsampling, NormParams)> {
            let layer = GeneratorLayer::Up(stage);
            let upsampling = match config.family {
                Family::Upsample => Upsampling::Nearest(winograd(layer)?),
                Family::Transpose => Upsampling::Transposed(source.up_phases(stage)?),
            };
            Ok((upsampling, source.norm(layer)?))
        };
        Ok(Self {
            stem: source.stem()?,
            down: [source.down(0)?, source.down(1)?],
            blocks,
            up: [up_stage(0)?, up_stage(1)?],
            head: source.head()?,
        })
    }

    /// Maps an NCHW f32 batch in [-1, 1] on the CPU to the other domain. The buffers it
    /// allocates, in order, are what [`memory::forward_peak_bytes`] accounts for.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        forward_channels_last(x, |image| self.run(image))
    }

    fn run(&self, image: Nhwc) -> Nhwc {
        let norm_relu = |mut x: Nhwc, params: &NormParams| {
            instance_norm(&mut x, affine(params), After::Relu);
            x
        };
        let padded = pad(&image, 3, 3, Border::Reflect);
        drop(image);
        let mut h = norm_relu(self.stem.0.forward(&padded), &self.stem.1);
        drop(padded);
        for (conv, params) in &self.down {
            h = norm_relu(conv.forward(&pad(&h, 1, 1, Border::Zero)), params);
        }
        for [(conv1, norm1), (conv2, norm2)] in &self.blocks {
            let t = norm_relu(conv1.forward(&pad(&h, 1, 1, Border::Reflect)), norm1);
            let mut out = conv2.forward(&pad(&t, 1, 1, Border::Reflect));
            drop(t);
            instance_norm(&mut out, affine(norm2), After::Residual(&h));
            h = out;
        }
        for (upsampling, params) in &self.up {
            let up = match upsampling {
                Upsampling::Nearest(conv) => conv.forward(&upsample2x_zero_pad1(&h)),
                Upsampling::Transposed(phases) => {
                    // Each phase makes every fourth output pixel from the input padded by one zero
                    // row and column at the bottom and right.
                    let padded = pad(&h, 0, 1, Border::Zero);
                    let outputs =
                        phases.iter().map(|(a, b, conv)| (*a, *b, conv.forward_sized(&padded, h.h, h.w)));
                    interleave_phases(h.n, 2 * h.h, 2 * h.w, phases[0].2.cout(), outputs)
                }
            };
            h = norm_relu(up, params);
        }
        let mut out = self.head.forward(&pad(&h, 3, 3, Border::Reflect));
        out.data.par_iter_mut().for_each(|v| *v = v.tanh());
        out
    }
}

fn affine(params: &NormParams) -> Option<(&[f32], &[f32])> {
    params.as_ref().map(|(g, b)| (g.as_slice(), b.as_slice()))
}

/// The NCHW-tensor wrapper of a channels-last pass: input copied to N×H×W×3, output back.
fn forward_channels_last(x: &Tensor, run: impl FnOnce(Nhwc) -> Nhwc) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if c != 3 {
        candle_core::bail!("the generator takes 3 channels, got {c}")
    }
    let input = x.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let image = Nhwc::from_nchw(&input, n, c, h, w);
    drop(input);
    let out = run(image);
    Tensor::from_vec(out.to_nchw(), (n, 3, out.h, out.w), x.device())
}

/// Where a generator's layers come from: PyTorch-named weights, keyed by the names the config
/// gives, so they cannot drift from the candle network's.
struct LayerSource<'a> {
    config: GeneratorConfig,
    weights: &'a HashMap<String, Tensor>,
}

impl LayerSource<'_> {
    fn get(&self, name: &str) -> Result<Vec<f32>> {
        match self.weights.get(name) {
            Some(t) => t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>(),
            None => candle_core::bail!("missing weight {name}"),
        }
    }

    fn weight(&self, layer: GeneratorLayer) -> Result<Vec<f32>> {
        self.get(&format!("{}.weight", self.config.conv_key(layer)))
    }

    fn bias(&self, layer: GeneratorLayer) -> Result<Vec<f32>> {
        self.get(&format!("{}.bias", self.config.conv_key(layer)))
    }

    fn norm(&self, layer: GeneratorLayer) -> Result<NormParams> {
        match self.config.norm_key(layer).filter(|_| self.config.norm_affine) {
            Some(key) => Ok(Some((self.get(&format!("{key}.weight"))?, self.get(&format!("{key}.bias"))?))),
            None => Ok(None),
        }
    }

    fn conv(&self, layer: GeneratorLayer, stride: usize) -> Result<GemmConv> {
        let [cout, cin, k, _] = self.config.weight_shape(layer);
        Ok(GemmConv::conv(&self.weight(layer)?, &self.bias(layer)?, cout, cin, k, stride))
    }

    fn stem(&self) -> Result<(GemmConv, NormParams)> {
        Ok((self.conv(GeneratorLayer::Stem, 1)?, self.norm(GeneratorLayer::Stem)?))
    }

    fn down(&self, i: usize) -> Result<(GemmConv, NormParams)> {
        Ok((self.conv(GeneratorLayer::Down(i), 2)?, self.norm(GeneratorLayer::Down(i))?))
    }

    fn head(&self) -> Result<GemmConv> {
        self.conv(GeneratorLayer::Head, 1)
    }

    /// An upsampling stage as four sub-pixel phases: the transposed convolution's own (input
    /// padded by one zero at the bottom and right), or nearest ×2 + 3×3 convolution folded into
    /// 2×2 kernels (input padded by one zero all round).
    fn up_phases(&self, stage: usize) -> Result<Vec<(usize, usize, GemmConv)>> {
        let layer = GeneratorLayer::Up(stage);
        let (cin, cout) = self.config.channels(layer);
        let (weight, bias) = (self.weight(layer)?, self.bias(layer)?);
        Ok(match self.config.family {
            Family::Transpose => GemmConv::transposed_phases(&weight, &bias, cin, cout),
            Family::Upsample => GemmConv::upsample_phases(&weight, &bias, cin, cout),
        })
    }
}

/// Assembles an `h`×`w` output from its four phases, (row parity, column parity, the phase's
/// (h/2)×(w/2) pixels), each consumed (and freed) before the next is made.
fn interleave_phases(
    n: usize,
    h: usize,
    w: usize,
    cout: usize,
    phases: impl Iterator<Item = (usize, usize, Nhwc)>,
) -> Nhwc {
    let mut out = Nhwc::zeros(n, h, w, cout);
    for (a, b, phase) in phases {
        out.data.par_chunks_mut(w * cout).enumerate().filter(|(row, _)| (row % h) % 2 == a).for_each(
            |(row, line)| {
                let (s, m) = (row / h, (row % h) / 2);
                let src = &phase.data[s * phase.sample_len() + m * phase.w * cout..][..phase.w * cout];
                for (x, pixel) in src.chunks(cout).enumerate() {
                    line[(2 * x + b) * cout..(2 * x + b + 1) * cout].copy_from_slice(pixel);
                }
            },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Generator;
    use candle_core::{DType, Device, Module};
    use candle_nn::{VarBuilder, VarMap};

    /// The candle generator's random initial weights for `config`; with `perturbed_norms`, affine
    /// norms move off their initial 1 and 0 so that they are really exercised.
    fn random_weights(config: GeneratorConfig, perturbed_norms: bool) -> HashMap<String, Tensor> {
        let varmap = VarMap::new();
        Generator::new(config, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap();
        let weights: Vec<(String, Tensor)> =
            varmap.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
        weights
            .into_iter()
            .map(|(k, t)| {
                let t = if perturbed_norms && k.ends_with(".weight") && t.rank() == 1 {
                    (&t + t.randn_like(0., 0.2).unwrap()).unwrap()
                } else {
                    t
                };
                (k, t)
            })
            .collect()
    }

    /// The executor against the candle generator on the same random weights.
    fn check(config: GeneratorConfig, shape: (usize, usize, usize, usize)) -> f64 {
        let weights = random_weights(config, true);
        let reference =
            Generator::new(config, VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu))
                .unwrap();
        let fast = FastGenerator::new(config, &weights).unwrap();
        let x = Tensor::rand(-1f32, 1., shape, &Device::Cpu).unwrap();
        relative_l2(&fast.forward(&x).unwrap(), &reference.forward(&x).unwrap())
    }

    fn relative_l2(ours: &Tensor, theirs: &Tensor) -> f64 {
        assert_eq!(ours.dims(), theirs.dims());
        let diff =
            (ours - theirs).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        let norm = theirs.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        (diff / norm).sqrt()
    }

    /// Family, affine norm, residual blocks and input shape (N, C, H, W).
    type GeneratorCase = (Family, bool, usize, (usize, usize, usize, usize));

    /// Odd sizes, batches, and a generator without residual blocks.
    const GENERATOR_CASES: [GeneratorCase; 5] = [
        (Family::Upsample, false, 2, (1, 3, 32, 32)),
        (Family::Upsample, true, 1, (2, 3, 28, 44)),
        (Family::Transpose, false, 3, (2, 3, 36, 20)),
        (Family::Transpose, true, 2, (1, 3, 52, 24)),
        (Family::Upsample, false, 0, (3, 3, 8, 12)),
    ];

    #[test]
    fn matches_the_candle_generator_on_random_shapes() {
        for (family, norm_affine, n_blocks, shape) in GENERATOR_CASES {
            let config = GeneratorConfig { family, ngf: 8, n_blocks, norm_affine };
            let err = check(config, shape);
            println!("{config:?} {shape:?}: relative L2 {err:.2e}");
            assert!(err < 1e-5, "{config:?} {shape:?}: relative L2 {err:e}");
        }
    }

    /// The folded 2×2 phases of nearest ×2 + 3×3 convolution give the unfolded layer's output.
    #[test]
    fn upsampling_phases_match_upsampling_then_convolving() {
        let (cin, cout, h, w) = (5, 7, 6, 9);
        let weight: Vec<f32> = (0..cout * cin * 9).map(|i| ((i * 37) % 23) as f32 / 11.0 - 1.0).collect();
        let bias: Vec<f32> = (0..cout).map(|i| i as f32 / 10.0).collect();
        let x = Nhwc {
            n: 2,
            h,
            w,
            c: cin,
            data: (0..2 * h * w * cin).map(|i| ((i * 53) % 31) as f32 / 15.0 - 1.0).collect(),
        };
        let expected = GemmConv::conv(&weight, &bias, cout, cin, 3, 1).forward(&upsample2x_zero_pad1(&x));
        let padded = pad(&x, 1, 1, Border::Zero);
        let phases = GemmConv::upsample_phases(&weight, &bias, cin, cout);
        let got = interleave_phases(
            2,
            2 * h,
            2 * w,
            cout,
            phases.iter().map(|(a, b, c)| (*a, *b, c.forward_sized(&padded, h, w))),
        );
        let worst = got.data.iter().zip(&expected.data).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst < 1e-5, "largest difference {worst:e}");
    }

    /// The AMX executor against the candle generator (f32) on the same random weights: bf16
    /// inputs to every convolution cost about three significant decimal digits.
    #[test]
    fn the_amx_executor_matches_the_candle_generator_to_bf16_precision() {
        let Some(amx) = crate::model::amx::Amx::detect() else {
            eprintln!("no AMX on this machine: the AMX executor is not exercised");
            return;
        };
        for (family, norm_affine, n_blocks, shape) in GENERATOR_CASES {
            let config = GeneratorConfig { family, ngf: 16, n_blocks, norm_affine };
            let weights = random_weights(config, true);
            let reference =
                Generator::new(config, VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu))
                    .unwrap();
            let amx = AmxGenerator::new(amx, config, &weights).unwrap();
            let x = Tensor::rand(-1f32, 1., shape, &Device::Cpu).unwrap();
            let err = relative_l2(&amx.forward(&x).unwrap(), &reference.forward(&x).unwrap());
            println!("{config:?} {shape:?}: relative L2 {err:.2e}");
            assert!(err < 2e-2, "{config:?} {shape:?}: relative L2 {err:e}");
        }
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
    }

    /// Each sample of a batch comes out bit for bit as it does alone, on any number of threads:
    /// batching and scheduling change nothing but speed (the CLI's folder mode relies on it).
    #[test]
    fn a_batch_computes_each_sample_exactly_as_alone_on_any_thread_count() {
        for (family, norm_affine) in [(Family::Upsample, false), (Family::Transpose, true)] {
            let config = GeneratorConfig { family, ngf: 8, n_blocks: 2, norm_affine };
            let weights = random_weights(config, norm_affine);
            let fast = FastGenerator::new(config, &weights).unwrap();
            let batch = Tensor::rand(-1f32, 1., (3, 3, 44, 68), &Device::Cpu).unwrap();
            let together = fast.forward(&batch).unwrap();
            for threads in [1, 3] {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let again = pool.install(|| fast.forward(&batch)).unwrap();
                assert!(bits(&again) == bits(&together), "{config:?}: {threads} threads change the result");
            }
            for i in 0..3 {
                let alone = fast.forward(&batch.narrow(0, i, 1).unwrap()).unwrap();
                assert_eq!(
                    bits(&together.narrow(0, i, 1).unwrap()),
                    bits(&alone),
                    "{config:?}: sample {i} of a batch differs from its run alone"
                );
            }
        }
    }
}
