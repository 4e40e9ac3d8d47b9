//! `nn.InstanceNorm2d` and the activation after it, as one candle op with its own backward.
//!
//! Composed from candle ops, a norm and its ReLU took eleven passes over the activation forward
//! and more backward, each allocating a tensor; training spent more time there than in the
//! convolutions' GEMMs. On the CPU in f32/f64 the fused op makes two passes for the statistics and
//! one for the output, and its backward recomputes them from the input and makes two more. Plane
//! sums run in f64 in a fixed order, so the result depends on neither the thread count nor the
//! batch. Other devices and dtypes keep the composed form.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Module, Result, Shape, Tensor, D};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::storage::contiguous_slice;

/// PyTorch's `InstanceNorm2d` epsilon.
pub const NORM_EPS: f64 = 1e-5;

/// What follows a norm; fused into it when the norm has no affine parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    Identity,
    Relu,
    /// `LeakyReLU(slope)`.
    LeakyRelu(f64),
}

impl Activation {
    fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Identity => Ok(x.clone()),
            Self::Relu => x.relu(),
            Self::LeakyRelu(slope) => candle_nn::ops::leaky_relu(x, slope),
        }
    }

    /// The activation of a normalised value, and its derivative there.
    fn at(self, v: f64) -> (f64, f64) {
        match self {
            Self::Identity => (v, 1.),
            Self::Relu if v > 0. => (v, 1.),
            Self::Relu => (0., 0.),
            Self::LeakyRelu(_) if v > 0. => (v, 1.),
            Self::LeakyRelu(slope) => (v * slope, slope),
        }
    }
}

/// `nn.InstanceNorm2d`: per sample and channel over H×W, biased variance, eps 1e-5, no running
/// statistics; optionally affine.
#[derive(Clone, Debug)]
pub struct InstanceNorm {
    affine: Option<(Tensor, Tensor)>,
}

impl InstanceNorm {
    /// Loads `weight` and `bias` from `vb` when `affine`; `vb` is unused otherwise.
    pub fn new(channels: usize, affine: bool, vb: VarBuilder) -> Result<Self> {
        let affine = if affine {
            let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?;
            let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?;
            Some((weight, bias))
        } else {
            None
        };
        Ok(Self { affine })
    }

    /// The norm followed by `activation`.
    pub fn forward_then(&self, x: &Tensor, activation: Activation) -> Result<Tensor> {
        let fused = x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64);
        match (&self.affine, fused) {
            (None, true) => x.contiguous()?.apply_op1(NormOp { activation }),
            (None, false) => activation.apply(&composed(x)?),
            (Some((weight, bias)), _) => {
                let normed = if fused {
                    x.contiguous()?.apply_op1(NormOp { activation: Activation::Identity })?
                } else {
                    composed(x)?
                };
                let c = x.dim(1)?;
                let affine = normed
                    .broadcast_mul(&weight.reshape((1, c, 1, 1))?)?
                    .broadcast_add(&bias.reshape((1, c, 1, 1))?)?;
                activation.apply(&affine)
            }
        }
    }
}

impl Module for InstanceNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_then(x, Activation::Identity)
    }
}

/// The norm from candle ops, for devices and dtypes the fused op does not take.
fn composed(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let flat = x.reshape((n, c, h * w))?;
    // Statistics in f32 at least, so reduced-precision activations keep an exact mean.
    let stats_dtype = if x.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
    let flat = flat.to_dtype(stats_dtype)?;
    let centered = flat.broadcast_sub(&flat.mean_keepdim(D::Minus1)?)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    centered.broadcast_div(&(var + NORM_EPS)?.sqrt()?)?.reshape((n, c, h, w))?.to_dtype(x.dtype())
}

/// Values a fused norm computes in: f32 and f64, summed in f64.
trait Float: candle_core::WithDType + Send + Sync {}
impl Float for f32 {}
impl Float for f64 {}

/// Lanes of the plane sums: independent accumulators the compiler can keep in vector registers.
const LANES: usize = 8;

/// Σ f(v) over `plane` in f64, in a fixed order.
fn plane_sum<T: Float>(plane: &[T], f: impl Fn(f64) -> f64) -> f64 {
    let mut lanes = [0f64; LANES];
    let chunks = plane.chunks_exact(LANES);
    let tail: f64 = chunks.remainder().iter().map(|v| f(v.to_f64())).sum();
    for chunk in chunks {
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            *lane += f(v.to_f64());
        }
    }
    lanes.iter().sum::<f64>() + tail
}

/// Mean and 1/√(var + eps) of one plane.
fn plane_stats<T: Float>(plane: &[T]) -> (f64, f64) {
    let len = plane.len() as f64;
    let mean = plane_sum(plane, |v| v) / len;
    let var = plane_sum(plane, |v| (v - mean) * (v - mean)) / len;
    (mean, 1. / (var + NORM_EPS).sqrt())
}

fn forward<T: Float>(x: &[T], plane: usize, activation: Activation) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(plane).zip(x.par_chunks(plane)).for_each(|(ys, xs)| {
        let (mean, inv_std) = plane_stats(xs);
        for (y, x) in ys.iter_mut().zip(xs) {
            *y = T::from_f64(activation.at((x.to_f64() - mean) * inv_std).0);
        }
    });
    y
}

/// dx from x and the gradient of the activation's output: with x̂ the normalised input and g the
/// gradient reaching x̂ through the activation, dx = (g − mean(g) − x̂ · mean(g x̂)) / σ.
fn backward<T: Float>(x: &[T], dy: &[T], plane: usize, activation: Activation) -> Vec<T> {
    let mut dx = vec![T::zero(); x.len()];
    dx.par_chunks_mut(plane).zip(x.par_chunks(plane).zip(dy.par_chunks(plane))).for_each(
        |(dxs, (xs, dys))| {
            let (mean, inv_std) = plane_stats(xs);
            let normed = |x: &T| (x.to_f64() - mean) * inv_std;
            let grad = |x: &T, dy: &T| dy.to_f64() * activation.at(normed(x)).1;
            let (mut sum_g, mut sum_gx) = (0f64, 0f64);
            for (x, dy) in xs.iter().zip(dys) {
                let g = grad(x, dy);
                sum_g += g;
                sum_gx += g * normed(x);
            }
            let len = plane as f64;
            let (mean_g, mean_gx) = (sum_g / len, sum_gx / len);
            for (dx, (x, dy)) in dxs.iter_mut().zip(xs.iter().zip(dys)) {
                *dx = T::from_f64((grad(x, dy) - mean_g - normed(x) * mean_gx) * inv_std);
            }
        },
    );
    dx
}

/// H·W of an NCHW layout.
fn plane_len(layout: &Layout) -> Result<usize> {
    let (_, _, h, w) = layout.shape().dims4()?;
    if h * w == 0 {
        candle_core::bail!("instance norm: empty planes")
    }
    Ok(h * w)
}

/// y = activation(IN(x)) on contiguous NCHW f32/f64.
#[derive(Clone, Copy, Debug)]
struct NormOp {
    activation: Activation,
}

impl CustomOp1 for NormOp {
    fn name(&self) -> &'static str {
        "instance-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let plane = plane_len(layout)?;
        let out = match storage {
            CpuStorage::F32(_) => {
                CpuStorage::F32(forward(contiguous_slice::<f32>(storage, layout)?, plane, self.activation))
            }
            CpuStorage::F64(_) => {
                CpuStorage::F64(forward(contiguous_slice::<f64>(storage, layout)?, plane, self.activation))
            }
            _ => candle_core::bail!("instance norm: f32 or f64 expected"),
        };
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&dy.contiguous()?, &NormGrad { activation: self.activation })?))
    }
}

/// (x, dy) → dx of [`NormOp`].
#[derive(Clone, Copy, Debug)]
struct NormGrad {
    activation: Activation,
}

impl CustomOp2 for NormGrad {
    fn name(&self) -> &'static str {
        "instance-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("instance norm grad: x is {:?} but dy is {:?}", l1.shape(), l2.shape())
        }
        let plane = plane_len(l1)?;
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(backward(
                contiguous_slice::<f32>(s1, l1)?,
                contiguous_slice(s2, l2)?,
                plane,
                self.activation,
            )),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(backward(
                contiguous_slice::<f64>(s1, l1)?,
                contiguous_slice(s2, l2)?,
                plane,
                self.activation,
            )),
            _ => candle_core::bail!("instance norm grad: f32 or f64 arguments of one dtype expected"),
        };
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn instance_norm_whitens_each_channel() {
        let x = Tensor::arange(0f32, 32., &Device::Cpu).unwrap().reshape((1, 2, 4, 4)).unwrap();
        let x = (x.sqr().unwrap() * 0.1).unwrap();
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        let y = InstanceNorm::new(2, false, vb).unwrap().forward(&x).unwrap();
        let y = y.reshape((2, 16)).unwrap();
        let mean = y.mean(1).unwrap().to_vec1::<f32>().unwrap();
        let var = y.sqr().unwrap().mean(1).unwrap().to_vec1::<f32>().unwrap();
        for c in 0..2 {
            assert!(mean[c].abs() < 1e-5, "{mean:?}");
            assert!((var[c] - 1.).abs() < 1e-3, "{var:?}");
        }
    }

    /// The fused op against the composed candle ops, forward and backward, for every activation
    /// on odd plane sizes (tails shorter than the sum lanes).
    #[test]
    fn fused_matches_composed_forward_and_backward() {
        use candle_core::Var;
        let device = Device::Cpu;
        let norm = InstanceNorm::new(3, false, VarBuilder::zeros(DType::F64, &device)).unwrap();
        for activation in [Activation::Identity, Activation::Relu, Activation::LeakyRelu(0.2)] {
            for (h, w) in [(1, 3), (5, 7), (9, 13)] {
                let x = Var::from_tensor(
                    &(Tensor::arange(0f64, (2 * 3 * h * w) as f64, &device).unwrap().sin().unwrap() * 3.)
                        .unwrap()
                        .reshape((2, 3, h, w))
                        .unwrap(),
                )
                .unwrap();
                let probe = x.as_tensor().cos().unwrap();
                let fused = norm.forward_then(&x, activation).unwrap();
                let reference = activation.apply(&composed(&x).unwrap()).unwrap();
                let max_diff = |a: &Tensor, b: &Tensor| -> f64 {
                    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap()
                };
                assert!(max_diff(&fused, &reference) < 1e-12, "{activation:?} {h}×{w} forward");
                let g1 = (fused * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                let g2 = (reference * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                let (g1, g2) = (g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap());
                assert!(max_diff(g1, g2) < 1e-10, "{activation:?} {h}×{w} backward");
            }
        }
    }
}
