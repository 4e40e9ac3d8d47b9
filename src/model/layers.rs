//! The layers candle lacks: reflection padding and nearest ×2 upsampling. On the CPU each is one
//! gather op whose backward is one scatter-add; elsewhere they are composed from differentiable
//! candle ops.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::storage::contiguous_slice;

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
/// On the CPU in f32/f64 one gather, whose backward is one scatter-add of each gradient onto the
/// pixel it was copied from. Elsewhere `index_select`, whose backward accumulates the same way
/// through `index_add`.
pub fn reflection_pad2d(x: &Tensor, left: usize, right: usize, top: usize, bottom: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if left.max(right) >= w || top.max(bottom) >= h {
        candle_core::bail!(
            "reflection padding of ({left}, {right}, {top}, {bottom}) needs an input larger than \
             the padding, got {h}×{w}"
        )
    }
    let (rows, cols) = (reflect_indices(h, top, bottom), reflect_indices(w, left, right));
    if on_fused_path(x) {
        return x.contiguous()?.apply_op1(Gather { in_h: h, in_w: w, rows, cols });
    }
    let mut x = x.clone();
    if left + right > 0 {
        x = x.index_select(&Tensor::new(cols, x.device())?, 3)?;
    }
    if top + bottom > 0 {
        x = x.index_select(&Tensor::new(rows, x.device())?, 2)?;
    }
    Ok(x)
}

/// `nn.ReflectionPad2d(pad)`: the same padding on all four sides.
pub fn reflection_pad(x: &Tensor, pad: usize) -> Result<Tensor> {
    reflection_pad2d(x, pad, pad, pad, pad)
}

/// Nearest-neighbour ×2 upsampling, whose backward sums the four copies.
///
/// On the CPU in f32/f64 a gather like the padding's; elsewhere a broadcast (candle's
/// `upsample_nearest2d` backward overwrites its input's gradient instead of adding to it).
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if on_fused_path(x) {
        let twice = |len: usize| (0..2 * len as u32).map(|i| i / 2).collect();
        return x.contiguous()?.apply_op1(Gather { in_h: h, in_w: w, rows: twice(h), cols: twice(w) });
    }
    x.reshape((n, c, h, 1, w, 1))?.broadcast_as((n, c, h, 2, w, 2))?.reshape((n, c, 2 * h, 2 * w))
}

/// Whether the gather ops below take this tensor.
fn on_fused_path(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// Output pixel (i, j) of each `in_h`×`in_w` plane is input pixel (rows[i], cols[j]).
#[derive(Clone, Debug)]
struct Gather {
    in_h: usize,
    in_w: usize,
    rows: Vec<u32>,
    cols: Vec<u32>,
}

impl Gather {
    fn in_plane(&self) -> usize {
        self.in_h * self.in_w
    }

    fn out_plane(&self) -> usize {
        self.rows.len() * self.cols.len()
    }

    fn gather<T: WithDType>(&self, x: &[T]) -> Vec<T> {
        let (in_plane, out_plane) = (self.in_plane(), self.out_plane());
        let mut y = vec![T::zero(); x.len() / in_plane * out_plane];
        y.par_chunks_mut(out_plane).zip(x.par_chunks(in_plane)).for_each(|(ys, xs)| {
            for (out_row, &r) in ys.chunks_mut(self.cols.len()).zip(&self.rows) {
                let src = &xs[r as usize * self.in_w..][..self.in_w];
                for (o, &c) in out_row.iter_mut().zip(&self.cols) {
                    *o = src[c as usize];
                }
            }
        });
        y
    }

    /// The gather's backward: each output gradient added onto its source pixel, plane by plane in
    /// a fixed order.
    fn scatter_add<T: WithDType>(&self, dy: &[T]) -> Vec<T> {
        let (in_plane, out_plane) = (self.in_plane(), self.out_plane());
        let mut dx = vec![T::zero(); dy.len() / out_plane * in_plane];
        dx.par_chunks_mut(in_plane).zip(dy.par_chunks(out_plane)).for_each(|(dxs, dys)| {
            for (grad_row, &r) in dys.chunks(self.cols.len()).zip(&self.rows) {
                let dst = &mut dxs[r as usize * self.in_w..][..self.in_w];
                for (&g, &c) in grad_row.iter().zip(&self.cols) {
                    dst[c as usize] += g;
                }
            }
        });
        dx
    }
}

impl CustomOp1 for Gather {
    fn name(&self) -> &'static str {
        "plane-gather"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, _, _) = layout.shape().dims4()?;
        let out = match storage {
            CpuStorage::F32(_) => CpuStorage::F32(self.gather(contiguous_slice::<f32>(storage, layout)?)),
            CpuStorage::F64(_) => CpuStorage::F64(self.gather(contiguous_slice::<f64>(storage, layout)?)),
            _ => candle_core::bail!("gather: f32 or f64 expected"),
        };
        Ok((out, Shape::from((n, c, self.rows.len(), self.cols.len()))))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(dy.contiguous()?.apply_op1_no_bwd(&ScatterAdd(self.clone()))?))
    }
}

/// The backward of a [`Gather`].
#[derive(Clone, Debug)]
struct ScatterAdd(Gather);

impl CustomOp1 for ScatterAdd {
    fn name(&self) -> &'static str {
        "plane-scatter-add"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, _, _) = layout.shape().dims4()?;
        let gather = &self.0;
        let out = match storage {
            CpuStorage::F32(_) => {
                CpuStorage::F32(gather.scatter_add(contiguous_slice::<f32>(storage, layout)?))
            }
            CpuStorage::F64(_) => {
                CpuStorage::F64(gather.scatter_add(contiguous_slice::<f64>(storage, layout)?))
            }
            _ => candle_core::bail!("scatter-add: f32 or f64 expected"),
        };
        Ok((out, Shape::from((n, c, gather.in_h, gather.in_w))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

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
}
