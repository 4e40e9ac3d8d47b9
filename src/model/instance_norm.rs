//! `nn.InstanceNorm2d` and the activation after it, as one candle op with its own backward.
//!
//! Composed from candle ops, a norm and its ReLU took eleven passes over the activation forward
//! and more backward, each allocating a tensor; training spent more time there than in the
//! convolutions' GEMMs. On the CPU in f32/f64 the fused op makes two passes for the statistics and
//! one for the output, and its backward recomputes them from the input and makes two more. Each
//! element is computed in its own type; plane sums add short runs of it in f64, in a fixed order,
//! so the result depends on neither the thread count nor the batch. Other devices and dtypes
//! keep the composed form.

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

/// Values a fused norm computes in: f32 and f64. Each element is worked on in its own type;
/// plane sums are taken in short runs of that type and the runs added up in f64.
trait Float: candle_core::WithDType + Send + Sync {}
impl Float for f32 {}
impl Float for f64 {}

/// Lanes of the plane sums: independent accumulators the compiler can keep in vector registers.
const LANES: usize = 16;
/// Elements per run: each lane adds `RUN / LANES` values in the element type before its sum
/// joins the f64 total, few enough that f32 runs stay exact to a few ulps of the plane's sum.
const RUN: usize = 4 * LANES;

/// Σ f(a, b) over the planes `a` and `b` element by element (`K` sums at once), in a fixed
/// order: the result depends on neither thread count nor batch.
#[inline(always)]
fn plane_sums<T: Float, const K: usize>(a: &[T], b: &[T], f: impl Fn(T, T) -> [T; K]) -> [f64; K] {
    debug_assert_eq!(a.len(), b.len());
    let mut total = [[0f64; LANES]; K];
    for (run_a, run_b) in a.chunks(RUN).zip(b.chunks(RUN)) {
        let mut lanes = [[T::zero(); LANES]; K];
        let (chunks_a, chunks_b) = (run_a.chunks_exact(LANES), run_b.chunks_exact(LANES));
        let tail = chunks_a.remainder().iter().zip(chunks_b.remainder());
        for (lane, (&a, &b)) in tail.enumerate() {
            for (sums, v) in lanes.iter_mut().zip(f(a, b)) {
                sums[lane] += v;
            }
        }
        for (chunk_a, chunk_b) in chunks_a.zip(chunks_b) {
            for lane in 0..LANES {
                for (sums, v) in lanes.iter_mut().zip(f(chunk_a[lane], chunk_b[lane])) {
                    sums[lane] += v;
                }
            }
        }
        for (total, lanes) in total.iter_mut().zip(&lanes) {
            for (t, v) in total.iter_mut().zip(lanes) {
                *t += v.to_f64();
            }
        }
    }
    total.map(|lanes| lanes.iter().sum())
}

/// Mean and 1/√(var + eps) of one plane, in its element type.
fn plane_stats<T: Float>(plane: &[T]) -> (T, T) {
    let len = plane.len() as f64;
    let [sum] = plane_sums(plane, plane, |v, _| [v]);
    let mean = T::from_f64(sum / len);
    let [squares] = plane_sums(plane, plane, |v, _| [(v - mean) * (v - mean)]);
    (mean, T::from_f64(1. / (squares / len + NORM_EPS).sqrt()))
}

/// `out[i] = f(a[i], b[i])`.
#[inline(always)]
fn map_plane<T: Float>(out: &mut [T], a: &[T], b: &[T], f: impl Fn(T, T) -> T) {
    for (o, (&a, &b)) in out.iter_mut().zip(a.iter().zip(b)) {
        *o = f(a, b);
    }
}

fn forward<T: Float>(x: &[T], plane: usize, activation: Activation) -> Vec<T> {
    let zero = T::zero();
    // One instantiation per activation keeps the element loops free of its branch.
    match activation {
        Activation::Identity => forward_with(x, plane, |v| v),
        Activation::Relu => forward_with(x, plane, |v| if v > zero { v } else { zero }),
        Activation::LeakyRelu(slope) => {
            let slope = T::from_f64(slope);
            forward_with(x, plane, |v| if v > zero { v } else { v * slope })
        }
    }
}

/// y = activation(x̂) per plane, x̂ the plane normalised.
fn forward_with<T: Float>(x: &[T], plane: usize, activation: impl Fn(T) -> T + Sync) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(plane).zip(x.par_chunks(plane)).for_each(|(ys, xs)| {
        let (mean, inv_std) = plane_stats(xs);
        map_plane(ys, xs, xs, |x, _| activation((x - mean) * inv_std));
    });
    y
}

fn backward<T: Float>(x: &[T], dy: &[T], plane: usize, activation: Activation) -> Vec<T> {
    let (zero, one) = (T::zero(), T::one());
    match activation {
        Activation::Identity => backward_with(x, dy, plane, |_| one),
        Activation::Relu => backward_with(x, dy, plane, |v| if v > zero { one } else { zero }),
        Activation::LeakyRelu(slope) => {
            let slope = T::from_f64(slope);
            backward_with(x, dy, plane, |v| if v > zero { one } else { slope })
        }
    }
}

/// dx from x and the gradient of the activation's output, given the activation's derivative:
/// with x̂ the normalised input and g the gradient reaching x̂ through the activation,
/// dx = (g − mean(g) − x̂ · mean(g x̂)) / σ.
fn backward_with<T: Float>(x: &[T], dy: &[T], plane: usize, derivative: impl Fn(T) -> T + Sync) -> Vec<T> {
    let mut dx = vec![T::zero(); x.len()];
    dx.par_chunks_mut(plane).zip(x.par_chunks(plane).zip(dy.par_chunks(plane))).for_each(
        |(dxs, (xs, dys))| {
            let (mean, inv_std) = plane_stats(xs);
            let normed = |x: T| (x - mean) * inv_std;
            let grad = |x: T, dy: T| dy * derivative(normed(x));
            let [sum_g, sum_gx] = plane_sums(xs, dys, |x, dy| {
                let g = grad(x, dy);
                [g, g * normed(x)]
            });
            let len = plane as f64;
            let (mean_g, mean_gx) = (T::from_f64(sum_g / len), T::from_f64(sum_gx / len));
            map_plane(dxs, xs, dys, |x, dy| (grad(x, dy) - mean_g - normed(x) * mean_gx) * inv_std);
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
    /// on odd plane sizes (tails shorter than the sum lanes, planes of several sum runs).
    #[test]
    fn fused_matches_composed_forward_and_backward() {
        use candle_core::Var;
        let device = Device::Cpu;
        let norm = InstanceNorm::new(3, false, VarBuilder::zeros(DType::F64, &device)).unwrap();
        for activation in [Activation::Identity, Activation::Relu, Activation::LeakyRelu(0.2)] {
            for (h, w) in [(1, 3), (5, 7), (9, 13), (19, 23)] {
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

    /// In f32 each element is computed in f32 and the plane sums in f32 runs: against the f64
    /// op on the same values, forward and backward, relative L2 within 1e-6 (f32 has 6e-8 ulps).
    #[test]
    fn f32_matches_f64_forward_and_backward() {
        use candle_core::Var;
        let device = Device::Cpu;
        let relative_l2 = |a: &Tensor, b: &Tensor| -> f64 {
            let a = a.to_dtype(DType::F64).unwrap();
            let diff = (&a - b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
            (diff / b.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()).sqrt()
        };
        for activation in [Activation::Identity, Activation::Relu, Activation::LeakyRelu(0.2)] {
            for (h, w) in [(5, 7), (19, 23), (64, 65)] {
                let values = (Tensor::arange(0f64, (2 * 3 * h * w) as f64, &device).unwrap() * 0.37)
                    .unwrap()
                    .sin()
                    .unwrap();
                let values = ((values * 2.5).unwrap() + 0.7).unwrap().reshape((2, 3, h, w)).unwrap();
                let probe = values.cos().unwrap();
                let run = |dtype: DType| {
                    let x = Var::from_tensor(&values.to_dtype(dtype).unwrap()).unwrap();
                    let norm = InstanceNorm::new(3, false, VarBuilder::zeros(dtype, &device)).unwrap();
                    let y = norm.forward_then(&x, activation).unwrap();
                    let loss = (&y * probe.to_dtype(dtype).unwrap()).unwrap().sum_all().unwrap();
                    let dx = loss.backward().unwrap().get(x.as_tensor()).unwrap().clone();
                    (y, dx)
                };
                let ((y32, dx32), (y64, dx64)) = (run(DType::F32), run(DType::F64));
                let (forward, backward) = (relative_l2(&y32, &y64), relative_l2(&dx32, &dx64));
                assert!(forward < 1e-6, "{activation:?} {h}×{w} forward: {forward:e}");
                assert!(backward < 1e-6, "{activation:?} {h}×{w} backward: {backward:e}");
            }
        }
    }
}
