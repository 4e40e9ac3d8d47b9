//! Convolution layers whose CPU path is im2col + GEMM in both directions.
//!
//! candle's CPU `conv2d` backward goes through a direct `conv_transpose2d` and a weight gradient
//! computed as a convolution with the whole image as kernel, which made a training step of even
//! a tiny generator take most of a second. Here the three products a convolution needs — output,
//! input gradient, weight gradient — are each one GEMM over an im2col matrix, tiled by output
//! rows so that the matrix stays small. A transposed convolution is the input-gradient product of
//! a convolution, so the same three kernels serve it. Other devices use candle's own ops.

use std::ops::Range;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Module, Result, Shape, Tensor, WithDType,
};
use candle_nn::{Init, VarBuilder};
use rayon::prelude::*;

use super::gemm::{matmul, Mat, MatMut, Scalar, Threads};
use super::scratch::Scratch;
use super::storage::contiguous_slice;
use super::winograd_train;

/// Upper bound on one im2col tile, in elements (16 MiB of f32).
const TILE_ELEMENTS: usize = 4 << 20;

/// Where a square-kernel convolution reads from and writes to, per sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geometry {
    /// Channels, height and width of the convolution's input.
    channels: usize,
    in_h: usize,
    in_w: usize,
    kernel: usize,
    stride: usize,
    pad: usize,
    out_h: usize,
    out_w: usize,
}

impl Geometry {
    /// A convolution of `config` over a `channels`×`in_h`×`in_w` input.
    fn forward(channels: usize, (in_h, in_w): (usize, usize), config: ConvConfig) -> Result<Self> {
        let ConvConfig { kernel, stride, padding: pad } = config;
        if in_h + 2 * pad < kernel || in_w + 2 * pad < kernel {
            candle_core::bail!(
                "conv2d: input {in_h}×{in_w} with padding {pad} is smaller than the {kernel}×{kernel} kernel"
            )
        }
        let out = |len: usize| (len + 2 * pad - kernel) / stride + 1;
        Ok(Self { channels, in_h, in_w, kernel, stride, pad, out_h: out(in_h), out_w: out(in_w) })
    }

    /// Rows of the im2col matrix: one per (channel, kernel row, kernel column).
    fn col_rows(&self) -> usize {
        self.channels * self.kernel * self.kernel
    }

    fn in_plane(&self) -> usize {
        self.in_h * self.in_w
    }

    fn out_plane(&self) -> usize {
        self.out_h * self.out_w
    }

    /// Output rows handled per tile.
    fn tile_rows(&self) -> usize {
        (TILE_ELEMENTS / (self.col_rows() * self.out_w).max(1)).clamp(1, self.out_h)
    }

    fn tiles(&self) -> impl Iterator<Item = Range<usize>> {
        let (step, end) = (self.tile_rows(), self.out_h);
        (0..end).step_by(step).map(move |start| start..(start + step).min(end))
    }

    /// Input coordinate read by output coordinate `o` through kernel tap `k`, if inside.
    fn source(&self, o: usize, k: usize, len: usize) -> Option<usize> {
        (o * self.stride + k).checked_sub(self.pad).filter(|&i| i < len)
    }

    /// The convolution that carries this one's output space back onto its input space: same
    /// kernel, flipped and with in and out channels swapped (see [`flip_transpose`]), zero padding
    /// `kernel − 1 − pad`. Its three products are this one's in another order, over an im2col
    /// matrix of `out_channels`·k² rows instead of `channels`·k²; that is what makes a layer with
    /// few outputs (the generator's last 64 → 3 7×7) cheap. Stride 1 only.
    fn dual(&self, out_channels: usize) -> Option<Self> {
        (self.stride == 1 && self.pad < self.kernel).then_some(Self {
            channels: out_channels,
            in_h: self.out_h,
            in_w: self.out_w,
            kernel: self.kernel,
            stride: 1,
            pad: self.kernel - 1 - self.pad,
            out_h: self.in_h,
            out_w: self.in_w,
        })
    }

    /// The output columns whose tap `kx` lands inside the input row, as a range.
    fn valid_columns(&self, kx: usize) -> Range<usize> {
        let first = self.pad.saturating_sub(kx).div_ceil(self.stride);
        let last = (self.in_w + self.pad).checked_sub(kx + 1).map_or(0, |v| v / self.stride + 1);
        first.min(self.out_w)..last.min(self.out_w).max(first.min(self.out_w))
    }
}

/// Fills `col` ([C·k·k, rows·out_w]) with the input patches of output rows `rows`.
fn im2col<T: WithDType>(x: &[T], g: &Geometry, rows: Range<usize>, col: &mut [T]) {
    let k = g.kernel;
    let cols = rows.len() * g.out_w;
    col.par_chunks_mut(k * k * cols).enumerate().for_each(|(c, block)| {
        let plane = &x[c * g.in_plane()..(c + 1) * g.in_plane()];
        for (tap, line) in block.chunks_mut(cols).enumerate() {
            let (ky, kx) = (tap / k, tap % k);
            let valid = g.valid_columns(kx);
            for (r, oy) in rows.clone().enumerate() {
                let out = &mut line[r * g.out_w..(r + 1) * g.out_w];
                let Some(iy) = g.source(oy, ky, g.in_h) else {
                    out.fill(T::zero());
                    continue;
                };
                out[..valid.start].fill(T::zero());
                out[valid.end..].fill(T::zero());
                let src = &plane[iy * g.in_w..(iy + 1) * g.in_w];
                let first = valid.start * g.stride + kx - g.pad;
                if g.stride == 1 {
                    out[valid.clone()].copy_from_slice(&src[first..first + valid.len()]);
                } else {
                    for (v, &s) in out[valid.clone()].iter_mut().zip(src[first..].iter().step_by(g.stride)) {
                        *v = s;
                    }
                }
            }
        }
    });
}

/// Adds the patches in `col` back onto the input positions they were read from.
fn col2im_add<T: WithDType>(col: &[T], g: &Geometry, rows: Range<usize>, x: &mut [T]) {
    let k = g.kernel;
    let cols = rows.len() * g.out_w;
    x.par_chunks_mut(g.in_plane()).enumerate().for_each(|(c, plane)| {
        let block = &col[c * k * k * cols..(c + 1) * k * k * cols];
        for (tap, line) in block.chunks(cols).enumerate() {
            let (ky, kx) = (tap / k, tap % k);
            let valid = g.valid_columns(kx);
            for (r, oy) in rows.clone().enumerate() {
                let Some(iy) = g.source(oy, ky, g.in_h) else { continue };
                let dst = &mut plane[iy * g.in_w..(iy + 1) * g.in_w];
                let first = valid.start * g.stride + kx - g.pad;
                let values = &line[r * g.out_w + valid.start..r * g.out_w + valid.end];
                for (d, &v) in dst[first..].iter_mut().step_by(g.stride).zip(values) {
                    *d += v;
                }
            }
        }
    });
}

/// `[o, c, k, k]` weights as `[c, o, k, k]` with each kernel turned by 180°: the weights of the
/// [`Geometry::dual`] convolution. Applied twice (with `o` and `c` swapped) it is the identity.
fn flip_transpose<T: Copy>(w: &[T], o: usize, c: usize, k: usize) -> Vec<T> {
    let taps = k * k;
    let mut flipped = Vec::with_capacity(w.len());
    for ci in 0..c {
        for oi in 0..o {
            let kernel = &w[(oi * c + ci) * taps..][..taps];
            flipped.extend(kernel.iter().rev());
        }
    }
    flipped
}

/// y[n, O, oh, ow] = w[O, C·k·k] · im2col(x[n]).
fn conv_forward<T: Scalar>(x: &[T], w: &[T], batch: usize, out_channels: usize, g: &Geometry) -> Vec<T> {
    let mut y = vec![T::zero(); batch * out_channels * g.out_plane()];
    let mut col = Scratch::<T>::new(g.col_rows() * g.tile_rows() * g.out_w);
    let weight = Mat::new(w, out_channels, g.col_rows(), g.col_rows());
    for (xs, ys) in x.chunks(g.channels * g.in_plane()).zip(y.chunks_mut(out_channels * g.out_plane())) {
        for rows in g.tiles() {
            let cols = rows.len() * g.out_w;
            let col = &mut col[..g.col_rows() * cols];
            im2col(xs, g, rows.clone(), col);
            let dst = MatMut::new(&mut ys[rows.start * g.out_w..], out_channels, cols, g.out_plane());
            matmul(dst, false, weight, Mat::new(col, g.col_rows(), cols, cols), Threads::All);
        }
    }
    y
}

/// The input-space image of output-space `y`: x[n] = col2im(wᵀ · y[n]). This is both a
/// convolution's input gradient and a transposed convolution's forward pass.
fn conv_transpose<T: Scalar>(y: &[T], w: &[T], batch: usize, out_channels: usize, g: &Geometry) -> Vec<T> {
    let mut x = vec![T::zero(); batch * g.channels * g.in_plane()];
    let mut col = Scratch::<T>::new(g.col_rows() * g.tile_rows() * g.out_w);
    let weight_t = Mat::new(w, out_channels, g.col_rows(), g.col_rows()).t();
    for (ys, xs) in y.chunks(out_channels * g.out_plane()).zip(x.chunks_mut(g.channels * g.in_plane())) {
        for rows in g.tiles() {
            let cols = rows.len() * g.out_w;
            let col = &mut col[..g.col_rows() * cols];
            let grad = Mat::new(&ys[rows.start * g.out_w..], out_channels, cols, g.out_plane());
            matmul(MatMut::new(col, g.col_rows(), cols, cols), false, weight_t, grad, Threads::All);
            col2im_add(col, g, rows, xs);
        }
    }
    x
}

/// dw[O, C·k·k] = Σₙ y[n] · im2col(x[n])ᵀ, for output-space `y` and input-space `x`.
fn conv_weight_grad<T: Scalar>(x: &[T], y: &[T], batch: usize, out_channels: usize, g: &Geometry) -> Vec<T> {
    let mut dw = vec![T::zero(); out_channels * g.col_rows()];
    let mut col = Scratch::<T>::new(g.col_rows() * g.tile_rows() * g.out_w);
    let mut first = true;
    for (xs, ys) in
        x.chunks(g.channels * g.in_plane()).zip(y.chunks(out_channels * g.out_plane())).take(batch)
    {
        for rows in g.tiles() {
            let cols = rows.len() * g.out_w;
            let col = &mut col[..g.col_rows() * cols];
            im2col(xs, g, rows.clone(), col);
            let grad = Mat::new(&ys[rows.start * g.out_w..], out_channels, cols, g.out_plane());
            matmul(
                MatMut::new(&mut dw, out_channels, g.col_rows(), g.col_rows()),
                !first,
                grad,
                Mat::new(col, g.col_rows(), cols, cols).t(),
                Threads::All,
            );
            first = false;
        }
    }
    dw
}

/// Which of the three products an op computes; all share one geometry.
#[derive(Clone, Copy, Debug)]
enum Product {
    /// (x, w) → y: the convolution.
    Forward,
    /// (y, w) → x: input gradient, or a transposed convolution.
    Transpose,
    /// (x, y) → w: weight gradient.
    WeightGrad,
}

/// One convolution product as a candle op. Arguments and result are contiguous NCHW tensors and
/// [O, C, k, k] weights; `geometry` describes the convolution (input side = x).
#[derive(Clone, Debug)]
struct ConvOp {
    product: Product,
    geometry: Geometry,
    batch: usize,
    out_channels: usize,
}

impl ConvOp {
    /// The product by im2col + GEMM, through the [`Geometry::dual`] convolution when its im2col
    /// matrix is at most half as tall.
    fn run<T: Scalar>(&self, a: &[T], b: &[T]) -> (Vec<T>, Shape) {
        let (g, n, o) = (&self.geometry, self.batch, self.out_channels);
        let (c, k) = (g.channels, g.kernel);
        let dual = g.dual(o).filter(|_| 2 * o <= c);
        let out = match (self.product, dual) {
            (Product::Forward, None) => conv_forward(a, b, n, o, g),
            (Product::Forward, Some(d)) => conv_transpose(a, &flip_transpose(b, o, c, k), n, c, &d),
            (Product::Transpose, None) => conv_transpose(a, b, n, o, g),
            (Product::Transpose, Some(d)) => conv_forward(a, &flip_transpose(b, o, c, k), n, c, &d),
            (Product::WeightGrad, None) => conv_weight_grad(a, b, n, o, g),
            (Product::WeightGrad, Some(d)) => flip_transpose(&conv_weight_grad(b, a, n, c, &d), c, o, k),
        };
        (out, self.shape())
    }

    /// The f32 products: a 3×3 stride-1 convolution's three products by Winograd where
    /// [`winograd_train::worthwhile`] says it is faster (ahead of the dual convolution, which
    /// only shortens im2col), everything else by im2col + GEMM. (f64, which the gradient checks
    /// use, always takes im2col.)
    fn run_f32(&self, a: &[f32], b: &[f32]) -> (Vec<f32>, Shape) {
        let g = &self.geometry;
        let winograd = g.kernel == 3
            && g.stride == 1
            && g.pad <= 1
            && winograd_train::worthwhile(g.channels, self.out_channels, (g.out_h, g.out_w));
        if winograd {
            self.run_winograd(a, b)
        } else {
            self.run::<f32>(a, b)
        }
    }

    /// The product by Winograd F(4×4, 3×3); the geometry must be a 3×3 stride-1 convolution.
    fn run_winograd(&self, a: &[f32], b: &[f32]) -> (Vec<f32>, Shape) {
        let (g, n) = (&self.geometry, self.batch);
        debug_assert!(g.kernel == 3 && g.stride == 1, "winograd: 3×3 stride-1 only");
        let (channels, input) = ((g.channels, self.out_channels), (g.in_h, g.in_w));
        let out = match self.product {
            Product::Forward => winograd_train::forward(a, b, n, channels, input, g.pad),
            Product::Transpose => winograd_train::input_grad(a, b, n, channels, input, g.pad),
            Product::WeightGrad => winograd_train::weight_grad(a, b, n, channels, input, g.pad),
        };
        (out, self.shape())
    }

    /// The shape of the product's result.
    fn shape(&self) -> Shape {
        let (g, n, o) = (&self.geometry, self.batch, self.out_channels);
        match self.product {
            Product::Forward => Shape::from((n, o, g.out_h, g.out_w)),
            Product::Transpose => Shape::from((n, g.channels, g.in_h, g.in_w)),
            Product::WeightGrad => Shape::from((o, g.channels, g.kernel, g.kernel)),
        }
    }
}

/// Which kernel [`conv3x3_f32`] runs.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conv3x3Kernel {
    /// im2col + GEMM as the layers run it (through the dual convolution where that is shorter).
    Im2colGemm,
    Winograd,
}

/// Which product [`conv3x3_f32`] computes, and from what.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conv3x3Product {
    /// (x, w) → y.
    Forward,
    /// (dy, w) → dx.
    InputGrad,
    /// (x, dy) → dw.
    WeightGrad,
}

/// One f32 3×3 stride-1 product of `channels` = (in, out) from NCHW operands `a`, `b` (see
/// [`Conv3x3Product`]; weights are [out, in, 3, 3]), forward input plane `input` and zero
/// padding `pad`, through a chosen kernel: what the benchmark and the tests compare.
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub fn conv3x3_f32(
    kernel: Conv3x3Kernel,
    product: Conv3x3Product,
    a: &[f32],
    b: &[f32],
    batch: usize,
    channels: (usize, usize),
    input: (usize, usize),
    pad: usize,
) -> Result<Vec<f32>> {
    let config = ConvConfig { kernel: 3, stride: 1, padding: pad };
    let geometry = Geometry::forward(channels.0, input, config)?;
    let product = match product {
        Conv3x3Product::Forward => Product::Forward,
        Conv3x3Product::InputGrad => Product::Transpose,
        Conv3x3Product::WeightGrad => Product::WeightGrad,
    };
    let op = ConvOp { product, geometry, batch, out_channels: channels.1 };
    Ok(match kernel {
        Conv3x3Kernel::Winograd => op.run_winograd(a, b).0,
        Conv3x3Kernel::Im2colGemm => op.run::<f32>(a, b).0,
    })
}

impl CustomOp2 for ConvOp {
    fn name(&self) -> &'static str {
        match self.product {
            Product::Forward => "conv2d-gemm",
            Product::Transpose => "conv2d-gemm-transpose",
            Product::WeightGrad => "conv2d-gemm-weight-grad",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                let (out, shape) = self.run_f32(contiguous_slice(s1, l1)?, contiguous_slice(s2, l2)?);
                Ok((CpuStorage::F32(out), shape))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                let (out, shape) = self.run::<f64>(contiguous_slice(s1, l1)?, contiguous_slice(s2, l2)?);
                Ok((CpuStorage::F64(out), shape))
            }
            _ => candle_core::bail!("conv: f32 or f64 arguments of one dtype expected"),
        }
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let op = |product| ConvOp { product, ..self.clone() };
        match self.product {
            // y = conv(x, w): dx = transpose(dy, w), dw = weight_grad(x, dy).
            Product::Forward => Ok((
                Some(grad.apply_op2_no_bwd(b, &op(Product::Transpose))?),
                Some(a.apply_op2_no_bwd(&grad, &op(Product::WeightGrad))?),
            )),
            // x = transpose(y, w): dy = conv(dx, w), dw = weight_grad(dx, y).
            Product::Transpose => Ok((
                Some(grad.apply_op2_no_bwd(b, &op(Product::Forward))?),
                Some(grad.apply_op2_no_bwd(a, &op(Product::WeightGrad))?),
            )),
            Product::WeightGrad => Err(candle_core::Error::BackwardNotSupported { op: self.name() }),
        }
    }
}

/// The geometry of a square-kernel convolution with symmetric zero padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvConfig {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

/// A convolution with bias and symmetric zero padding (all of ours are).
#[derive(Clone, Debug)]
pub struct Conv2d {
    /// [out, in, k, k], PyTorch's layout.
    weight: Tensor,
    bias: Tensor,
    config: ConvConfig,
}

impl Conv2d {
    /// Loads `weight` and `bias`; when creating fresh variables, PyTorch's default init.
    pub fn new(cin: usize, cout: usize, config: ConvConfig, vb: VarBuilder) -> Result<Self> {
        let kernel = config.kernel;
        let bound = 1. / ((cin * kernel * kernel) as f64).sqrt();
        let init = Init::Uniform { lo: -bound, up: bound };
        let weight = vb.get_with_hints((cout, cin, kernel, kernel), "weight", init)?;
        let bias = vb.get_with_hints(cout, "bias", init)?;
        Ok(Self { weight, bias, config })
    }
}

/// Whether the GEMM kernels take this tensor (else candle's own op does).
fn on_gemm_path(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// Runs one product as a differentiable candle op.
fn apply(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    product: Product,
    geometry: Geometry,
    out_channels: usize,
) -> Result<Tensor> {
    let op = BiasedConvOp(ConvOp { product, geometry, batch: x.dim(0)?, out_channels });
    x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)
}

/// A convolution product (forward, or a transposed convolution) followed by its bias, as one op:
/// the bias is added in place instead of by a broadcast op allocating a second output, and its
/// gradient is one pass of per-channel sums.
#[derive(Clone, Debug)]
struct BiasedConvOp(ConvOp);

/// Adds `bias` in place to the planes of an NCHW product of shape `shape`.
fn add_bias<T: Scalar>(mut out: Vec<T>, shape: &Shape, bias: &[T]) -> Result<Vec<T>> {
    let (_, channels, h, w) = shape.dims4()?;
    if bias.len() != channels {
        candle_core::bail!("conv: {} biases for {channels} output channels", bias.len())
    }
    out.par_chunks_mut(h * w).enumerate().for_each(|(plane, values)| {
        let b = bias[plane % channels];
        values.iter_mut().for_each(|v| *v += b);
    });
    Ok(out)
}

impl CustomOp3 for BiasedConvOp {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    /// The product as [`ConvOp`] computes it, then the bias.
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (product, shape) = self.0.cpu_fwd(s1, l1, s2, l2)?;
        let biased = match (product, s3) {
            (CpuStorage::F32(out), CpuStorage::F32(_)) => {
                CpuStorage::F32(add_bias(out, &shape, contiguous_slice(s3, l3)?)?)
            }
            (CpuStorage::F64(out), CpuStorage::F64(_)) => {
                CpuStorage::F64(add_bias(out, &shape, contiguous_slice(s3, l3)?)?)
            }
            _ => candle_core::bail!("conv: the bias must have the arguments' dtype"),
        };
        Ok((biased, shape))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (da, db) = self.0.bwd(a, b, res, grad)?;
        Ok((da, db, Some(grad.contiguous()?.apply_op1_no_bwd(&ChannelSums)?)))
    }
}

/// Σ over batch and plane per channel of an NCHW tensor: a bias's gradient. Summed in f64 plane
/// by plane, in order.
struct ChannelSums;

impl ChannelSums {
    fn run<T: Scalar>(values: &[T], channels: usize, plane: usize) -> Vec<T> {
        let sums: Vec<f64> = values.par_chunks(plane).map(|p| p.iter().map(|v| v.to_f64()).sum()).collect();
        (0..channels).map(|c| T::from_f64(sums.iter().skip(c).step_by(channels).sum())).collect()
    }
}

impl CustomOp1 for ChannelSums {
    fn name(&self) -> &'static str {
        "conv-bias-grad"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, channels, h, w) = layout.shape().dims4()?;
        let out = match storage {
            CpuStorage::F32(_) => {
                CpuStorage::F32(Self::run::<f32>(contiguous_slice(storage, layout)?, channels, h * w))
            }
            CpuStorage::F64(_) => {
                CpuStorage::F64(Self::run::<f64>(contiguous_slice(storage, layout)?, channels, h * w))
            }
            _ => candle_core::bail!("conv bias grad: f32 or f64 expected"),
        };
        Ok((out, Shape::from(channels)))
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if on_gemm_path(x) {
            let (_, c, h, w) = x.dims4()?;
            let geometry = Geometry::forward(c, (h, w), self.config)?;
            return apply(x, &self.weight, &self.bias, Product::Forward, geometry, self.weight.dim(0)?);
        }
        let y = x.conv2d(&self.weight, self.config.padding, self.config.stride, 1, 1)?;
        y.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)
    }
}

/// ConvTranspose2d(k3, s2, p1, output_padding 1): exact ×2 upsampling, PyTorch's (in, out, k, k)
/// weight layout.
#[derive(Clone, Debug)]
pub struct ConvTranspose2d {
    weight: Tensor,
    bias: Tensor,
}

impl ConvTranspose2d {
    /// The convolution this one transposes.
    const CONFIG: ConvConfig = ConvConfig { kernel: 3, stride: 2, padding: 1 };

    pub fn new(cin: usize, cout: usize, vb: VarBuilder) -> Result<Self> {
        let kernel = Self::CONFIG.kernel;
        let bound = 1. / ((cout * kernel * kernel) as f64).sqrt();
        let init = Init::Uniform { lo: -bound, up: bound };
        let weight = vb.get_with_hints((cin, cout, kernel, kernel), "weight", init)?;
        let bias = vb.get_with_hints(cout, "bias", init)?;
        Ok(Self { weight, bias })
    }
}

impl Module for ConvTranspose2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if on_gemm_path(x) {
            // The convolution this transposes maps the 2H×2W output back onto H×W.
            let (_, cin, h, w) = x.dims4()?;
            let cout = self.weight.dim(1)?;
            let geometry = Geometry::forward(cout, (2 * h, 2 * w), Self::CONFIG)?;
            debug_assert_eq!((geometry.out_h, geometry.out_w), (h, w));
            return apply(x, &self.weight, &self.bias, Product::Transpose, geometry, cin);
        }
        let ConvConfig { stride, padding, .. } = Self::CONFIG;
        let y = x.conv_transpose2d(&self.weight, padding, 1, stride, 1)?;
        y.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn randn(shape: &[usize]) -> Tensor {
        Tensor::randn(0f32, 1., shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap()
    }

    /// The GEMM path against candle's own ops, forward and backward, on awkward shapes.
    #[test]
    fn conv_matches_candle_forward_and_backward() {
        for &(n, c, o, h, w, k, s, p) in &[
            (2, 3, 5, 9, 7, 3, 1, 1),
            (1, 4, 6, 10, 12, 3, 2, 1),
            (3, 2, 3, 12, 9, 7, 1, 0),
            (2, 5, 1, 8, 8, 4, 2, 1),
            // Few outputs: through the dual convolution, with odd and even kernels.
            (2, 9, 3, 11, 13, 7, 1, 0),
            (1, 8, 2, 7, 10, 3, 1, 1),
            (2, 6, 1, 5, 6, 4, 1, 2),
        ] {
            let x = Var::from_tensor(&randn(&[n, c, h, w])).unwrap();
            let weight = Var::from_tensor(&randn(&[o, c, k, k])).unwrap();
            let conv = Conv2d {
                weight: weight.as_tensor().clone(),
                bias: Tensor::zeros(o, DType::F32, &Device::Cpu).unwrap(),
                config: ConvConfig { kernel: k, stride: s, padding: p },
            };
            let ours = conv.forward(x.as_tensor()).unwrap();
            let theirs = x.as_tensor().conv2d(weight.as_tensor(), p, s, 1, 1).unwrap();
            assert!(max_diff(&ours, &theirs) < 1e-4, "forward {:?}", (n, c, o, h, w, k, s, p));
            let probe = randn(ours.dims());
            let g1 = (ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &weight] {
                let (a, b) = (g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
                assert!(max_diff(a, b) < 1e-3, "gradient {:?}", (n, c, o, h, w, k, s, p));
            }
        }
    }

    /// Layers wide enough for the Winograd route, in f32 forward and backward, against the same
    /// layers in f64 (which always take im2col): the dispatch wires x, dy, w and the padding
    /// through correctly. All three f32 products must be Winograd's to the bit, also for a layer
    /// with few outputs (64 → 32), which would otherwise take the dual convolution.
    #[test]
    fn winograd_routed_layer_matches_f64_forward_and_backward() {
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for ((c, o), padding) in [(32, 40), (64, 32)].into_iter().flat_map(|co| [(co, 0), (co, 1)]) {
            let (n, h, w) = (2, 35, 34);
            assert!(winograd_train::worthwhile(c, o, (h + 2 * padding - 2, w + 2 * padding - 2)));
            let conv = |weight: &Var, dtype| Conv2d {
                weight: weight.as_tensor().clone(),
                bias: Tensor::zeros(o, dtype, &Device::Cpu).unwrap(),
                config: ConvConfig { kernel: 3, stride: 1, padding },
            };
            let run = |x: &Var, weight: &Var| {
                let y = conv(weight, x.dtype()).forward(x.as_tensor()).unwrap();
                let probe = Tensor::ones(y.dims(), x.dtype(), &Device::Cpu).unwrap().cumsum(3).unwrap();
                let grads = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                let dx = grads.get(x.as_tensor()).unwrap().clone();
                let dw = grads.get(weight.as_tensor()).unwrap().clone();
                (probe, [y, dx, dw])
            };
            let x = Var::from_tensor(&randn(&[n, c, h, w])).unwrap();
            let weight = Var::from_tensor(&randn(&[o, c, 3, 3])).unwrap();
            let (probe, ours) = run(&x, &weight);
            let (xs, ws, dys) = (flat(x.as_tensor()), flat(weight.as_tensor()), flat(&probe));
            let winograd = [
                winograd_train::forward(&xs, &ws, n, (c, o), (h, w), padding),
                winograd_train::input_grad(&dys, &ws, n, (c, o), (h, w), padding),
                winograd_train::weight_grad(&xs, &dys, n, (c, o), (h, w), padding),
            ];
            // Same values in f64: rebuild from the f32 draws.
            let to_f64 = |v: &Var| Var::from_tensor(&v.as_tensor().to_dtype(DType::F64).unwrap()).unwrap();
            let (_, reference) = run(&to_f64(&x), &to_f64(&weight));
            for (name, ((a, b), direct)) in
                ["y", "dx", "dw"].iter().zip(ours.iter().zip(&reference).zip(&winograd))
            {
                let case = (c, o, padding, name);
                assert!(flat(a) == *direct, "{case:?}: not Winograd's result");
                let a = a.to_dtype(DType::F64).unwrap();
                let diff = (&a - b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
                let norm = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
                let error = (diff / norm).sqrt();
                assert!(error < 1e-5, "{case:?}: relative L2 error {error:e}");
            }
        }
    }

    #[test]
    fn transposed_conv_matches_candle() {
        let x = randn(&[2, 6, 5, 7]);
        let weight = randn(&[6, 4, 3, 3]);
        let conv = ConvTranspose2d {
            weight: weight.clone(),
            bias: Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
        };
        let ours = conv.forward(&x).unwrap();
        let theirs = x.conv_transpose2d(&weight, 1, 1, 2, 1).unwrap();
        assert_eq!(ours.dims(), &[2, 4, 10, 14]);
        assert!(max_diff(&ours, &theirs) < 1e-4);
    }

    #[test]
    fn tiles_cover_every_output_row_once() {
        let g = Geometry::forward(64, (256, 256), ConvConfig { kernel: 7, stride: 1, padding: 0 }).unwrap();
        let rows: Vec<usize> = g.tiles().flatten().collect();
        assert_eq!(rows, (0..g.out_h).collect::<Vec<_>>());
        assert!(g.tile_rows() < g.out_h, "a 64-channel 7×7 layer at 256² must be tiled");
    }
}
