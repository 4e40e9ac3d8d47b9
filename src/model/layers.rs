//! The layers candle lacks, composed from differentiable candle ops so that training gets their
//! gradients for free: reflection padding, instance norm, nearest ×2 upsampling.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// PyTorch's `InstanceNorm2d` epsilon.
pub const NORM_EPS: f64 = 1e-5;

/// Source index of each output position when reflecting `before`/`after` extra entries around a
/// dimension of length `len`, as PyTorch's `ReflectionPad` does (the edge itself is not
/// repeated). Padding wider than the dimension keeps reflecting back and forth, which PyTorch
/// refuses; a dimension of length 1 repeats its one entry.
pub(crate) fn reflect_indices(len: usize, before: usize, after: usize) -> Vec<u32> {
    let period = 2 * (len as i64 - 1);
    (-(before as i64)..len as i64 + after as i64)
        .map(|i| {
            if period == 0 {
                return 0;
            }
            let folded = i.rem_euclid(period);
            (if folded >= len as i64 { period - folded } else { folded }) as u32
        })
        .collect()
}

/// Reflection padding of the last two dimensions of an NCHW tensor.
///
/// Built from `index_select`, whose backward accumulates through `index_add`, so gradients of
/// the reflected border land on the pixels they were copied from.
pub fn reflection_pad2d(x: &Tensor, left: usize, right: usize, top: usize, bottom: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if left.max(right) >= w || top.max(bottom) >= h {
        candle_core::bail!(
            "reflection padding of ({left}, {right}, {top}, {bottom}) needs an input larger than \
             the padding, got {h}×{w}"
        )
    }
    let mut x = x.clone();
    if left + right > 0 {
        let idx = Tensor::new(reflect_indices(w, left, right), x.device())?;
        x = x.index_select(&idx, 3)?;
    }
    if top + bottom > 0 {
        let idx = Tensor::new(reflect_indices(h, top, bottom), x.device())?;
        x = x.index_select(&idx, 2)?;
    }
    Ok(x)
}

/// `nn.ReflectionPad2d(pad)`: the same padding on all four sides.
pub fn reflection_pad(x: &Tensor, pad: usize) -> Result<Tensor> {
    reflection_pad2d(x, pad, pad, pad, pad)
}

/// Nearest-neighbour ×2 upsampling as a broadcast, whose backward sums the four copies.
///
/// candle's `upsample_nearest2d` backward overwrites its input's gradient instead of adding to
/// it; this form has no such trap.
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    x.reshape((n, c, h, 1, w, 1))?.broadcast_as((n, c, h, 2, w, 2))?.reshape((n, c, 2 * h, 2 * w))
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
}

impl Module for InstanceNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let flat = x.reshape((n, c, h * w))?;
        // Statistics in f32 at least, so reduced-precision activations keep an exact mean.
        let stats_dtype = if x.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
        let flat = flat.to_dtype(stats_dtype)?;
        let centered = flat.broadcast_sub(&flat.mean_keepdim(D::Minus1)?)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed =
            centered.broadcast_div(&(var + NORM_EPS)?.sqrt()?)?.reshape((n, c, h, w))?.to_dtype(x.dtype())?;
        match &self.affine {
            None => Ok(normed),
            Some((weight, bias)) => normed
                .broadcast_mul(&weight.reshape((1, c, 1, 1))?)?
                .broadcast_add(&bias.reshape((1, c, 1, 1))?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn reflect_indices_match_pytorch() {
        // ReflectionPad1d(2) on [0 1 2 3] gives [2 1 0 1 2 3 2 1].
        assert_eq!(reflect_indices(4, 2, 2), vec![2, 1, 0, 1, 2, 3, 2, 1]);
        assert_eq!(reflect_indices(5, 0, 3), vec![0, 1, 2, 3, 4, 3, 2, 1]);
        assert_eq!(reflect_indices(2, 0, 6), vec![0, 1, 0, 1, 0, 1, 0, 1]);
        assert_eq!(reflect_indices(1, 0, 3), vec![0, 0, 0, 0]);
    }

    #[test]
    fn reflection_pad_refuses_padding_as_large_as_the_input() {
        let x = Tensor::zeros((1, 1, 3, 3), DType::F32, &Device::Cpu).unwrap();
        let err = reflection_pad(&x, 3).unwrap_err().to_string();
        assert!(err.contains("needs an input larger than the padding"), "{err}");
    }

    #[test]
    fn upsample_repeats_each_pixel_twice_in_each_direction() {
        let x = Tensor::new(&[[[[1f32, 2.], [3., 4.]]]], &Device::Cpu).unwrap();
        let y = upsample_nearest2x(&x).unwrap().squeeze(0).unwrap().squeeze(0).unwrap();
        let expected = [[1f32, 1., 2., 2.], [1., 1., 2., 2.], [3., 3., 4., 4.], [3., 3., 4., 4.]];
        assert_eq!(y.to_vec2::<f32>().unwrap(), expected.map(|r| r.to_vec()).to_vec());
    }

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
}
