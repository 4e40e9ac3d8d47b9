//! Channels-last activations, and the padding and norm passes between convolutions.

use rayon::prelude::*;

use crate::model::amx::{bf16, Bf16Buffer};
use crate::model::instance_norm::NORM_EPS;
use crate::model::layers::reflect_indices;

/// A batch of images laid out N×H×W×C, so one pixel's channels are contiguous.
#[derive(Clone, Debug)]
pub struct Nhwc {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub data: Vec<f32>,
}

impl Nhwc {
    pub fn zeros(n: usize, h: usize, w: usize, c: usize) -> Self {
        Self { n, h, w, c, data: vec![0.0; n * h * w * c] }
    }

    pub fn sample_len(&self) -> usize {
        self.h * self.w * self.c
    }

    /// From N×C×H×W.
    pub fn from_nchw(data: &[f32], n: usize, c: usize, h: usize, w: usize) -> Self {
        let mut out = Self::zeros(n, h, w, c);
        let plane = h * w;
        out.data.par_chunks_mut(plane * c).zip(data.par_chunks(plane * c)).for_each(|(dst, src)| {
            for (p, pixel) in dst.chunks_mut(c).enumerate() {
                for (ch, v) in pixel.iter_mut().enumerate() {
                    *v = src[ch * plane + p];
                }
            }
        });
        out
    }

    /// To N×C×H×W.
    pub fn to_nchw(&self) -> Vec<f32> {
        let plane = self.h * self.w;
        let c = self.c;
        let mut out = vec![0.0; self.data.len()];
        out.par_chunks_mut(plane * c).zip(self.data.par_chunks(plane * c)).for_each(|(dst, src)| {
            for (p, pixel) in src.chunks(c).enumerate() {
                for (ch, v) in pixel.iter().enumerate() {
                    dst[ch * plane + p] = *v;
                }
            }
        });
        out
    }
}

/// How the border of a padded copy is filled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Border {
    /// PyTorch's `ReflectionPad2d`.
    Reflect,
    Zero,
}

/// A copy of `x` with `before` pixels added above and to the left, and `after` below and to the
/// right.
pub fn pad(x: &Nhwc, before: usize, after: usize, border: Border) -> Nhwc {
    let (h, w) = (x.h + before + after, x.w + before + after);
    let mut out = Nhwc::zeros(x.n, h, w, x.c);
    pad_into(x, before, after, border, &mut out.data, x.c, |v| v);
    out
}

/// `pad`, rounded to bf16 for the AMX convolutions, each pixel's channels followed by zeros up to
/// `channels` (the norms write such copies themselves: [`instance_norm_bf16`]).
#[cfg(test)]
pub fn pad_bf16(x: &Nhwc, before: usize, after: usize, border: Border, channels: usize) -> Bf16Nhwc {
    assert!(channels >= x.c, "bf16 copy with fewer channels than its source");
    let mut out = Bf16Nhwc::zeros(x.n, x.h + before + after, x.w + before + after, channels);
    let len = out.sample_len() * out.n;
    pad_into(x, before, after, border, &mut out.data[..len], channels, bf16);
    out
}

/// Fills `out` (zeroed, N×(H+before+after)×(W+before+after)×`channels`) with the padded copy of
/// `x`, each value passed through `convert`; channels past `x.c` stay as they are.
fn pad_into<T: Copy + Send + Sync>(
    x: &Nhwc,
    before: usize,
    after: usize,
    border: Border,
    out: &mut [T],
    channels: usize,
    convert: impl Fn(f32) -> T + Sync,
) {
    let (h, w, c) = (x.h + before + after, x.w + before + after, x.c);
    let (rows, cols) = match border {
        Border::Reflect => (reflect_indices(x.h, before, after), reflect_indices(x.w, before, after)),
        Border::Zero => (Vec::new(), Vec::new()),
    };
    out.par_chunks_mut(w * channels).enumerate().for_each(|(row_index, row)| {
        let (sample, y) = (row_index / h, row_index % h);
        let src_y = match border {
            Border::Reflect => rows[y] as usize,
            Border::Zero if y < before || y >= before + x.h => return,
            Border::Zero => y - before,
        };
        let src = &x.data[sample * x.sample_len() + src_y * x.w * c..][..x.w * c];
        let copy = |row: &mut [T], xo: usize, sx: usize| {
            for (d, s) in row[xo * channels..][..c].iter_mut().zip(&src[sx * c..(sx + 1) * c]) {
                *d = convert(*s);
            }
        };
        if channels == c {
            // The interior is one run of values: a single loop the compiler turns into a copy.
            for (d, s) in row[before * c..][..x.w * c].iter_mut().zip(src) {
                *d = convert(*s);
            }
        } else {
            for sx in 0..x.w {
                copy(row, before + sx, sx);
            }
        }
        if border == Border::Reflect {
            for xo in (0..before).chain(before + x.w..w) {
                copy(row, xo, cols[xo] as usize);
            }
        }
    });
}

/// A bf16 copy of `x` in which pixel (y, x) holds the channels of pixels (y, x) to
/// (y, x + k − 1) one after another, then zeros up to `channels`: a k-wide stride-1 convolution
/// of `x` is a k×1 one of this copy, `k − 1` pixels narrower.
pub fn fold_columns_bf16(x: &Nhwc, k: usize, channels: usize) -> Bf16Nhwc {
    let c = x.c;
    assert!(channels >= k * c, "folded copy with fewer channels than it holds");
    let w = x.w - k + 1;
    let mut out = Bf16Nhwc::zeros(x.n, x.h, w, channels);
    let len = out.sample_len() * out.n;
    out.data[..len].par_chunks_mut(w * channels).zip(x.data.par_chunks(x.w * c)).for_each(|(line, row)| {
        for (pixel, window) in line.chunks_exact_mut(channels).zip(row.windows(k * c).step_by(c)) {
            for (d, v) in pixel.iter_mut().zip(window) {
                *d = bf16(*v);
            }
        }
    });
    out
}

/// A batch of bf16 images laid out N×H×W×C, as the AMX convolutions read them. The buffer ends
/// in [`Bf16Nhwc::SLACK_PIXELS`] pixels of zeros: a tile of 16 output pixels in the last row may
/// start inside the image and run past its end, into rows whose results are discarded.
#[derive(Clone, Debug)]
pub struct Bf16Nhwc {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub data: Bf16Buffer,
}

impl Bf16Nhwc {
    /// Enough for 16 rows of a stride-2 tile past the last pixel, and one more 32-value step.
    pub const SLACK_PIXELS: usize = 33;

    pub fn zeros(n: usize, h: usize, w: usize, c: usize) -> Self {
        Self { n, h, w, c, data: Bf16Buffer::zeros((n * h * w + Self::SLACK_PIXELS) * c) }
    }

    /// Values held, slack and alignment included.
    pub fn values(n: usize, h: usize, w: usize, c: usize) -> usize {
        (n * h * w + Self::SLACK_PIXELS) * c + Bf16Buffer::ALIGNMENT_SLACK
    }

    pub fn sample_len(&self) -> usize {
        self.h * self.w * self.c
    }
}

/// Nearest ×2 upsampling with a zero border of one pixel, ready for a 3×3 convolution.
pub fn upsample2x_zero_pad1(x: &Nhwc) -> Nhwc {
    let (h, w, c) = (2 * x.h + 2, 2 * x.w + 2, x.c);
    let mut out = Nhwc::zeros(x.n, h, w, c);
    out.data.par_chunks_mut(w * c).enumerate().for_each(|(row_index, row)| {
        let (sample, y) = (row_index / h, row_index % h);
        if y == 0 || y == h - 1 {
            return;
        }
        let src = &x.data[sample * x.sample_len() + (y - 1) / 2 * x.w * c..][..x.w * c];
        for (sx, pixel) in src.chunks(c).enumerate() {
            row[(1 + 2 * sx) * c..(3 + 2 * sx) * c].chunks_mut(c).for_each(|d| d.copy_from_slice(pixel));
        }
    });
    out
}

/// What follows an instance norm in place.
#[derive(Clone, Copy, Debug)]
pub enum After<'a> {
    Relu,
    /// Add the residual block's input (no activation).
    Residual(&'a Nhwc),
}

impl<'a> After<'a> {
    /// Sample `s`'s part of the residual to add, if any.
    fn residual_of(&self, s: usize, sample_len: usize) -> Option<&'a [f32]> {
        match self {
            After::Residual(r) => Some(&r.data[s * sample_len..(s + 1) * sample_len]),
            After::Relu => None,
        }
    }
}

/// Pixels per partial sum of the instance-norm statistics. Fixed, so that how the sums are
/// split, and therefore their rounding, depends neither on the thread count nor on the batch;
/// small, so that even the 64×64 planes of the residual blocks spread over 16 threads.
const NORM_CHUNK_PIXELS: usize = 256;

/// Instance norm (biased variance, eps 1e-5, optional scale and shift) per sample and channel,
/// then ReLU or a residual add, in place. Statistics are accumulated in f64, over fixed chunks
/// added in order: every run gives the same bits whatever the scheduling.
pub fn instance_norm(x: &mut Nhwc, affine: Option<(&[f32], &[f32])>, after: After) {
    let c = x.c;
    let sample_len = x.sample_len();
    for s in 0..x.n {
        let data = &mut x.data[s * sample_len..(s + 1) * sample_len];
        let norm = Coefficients::of(data, c, affine);
        let residual = after.residual_of(s, sample_len);
        let chunk = NORM_CHUNK_PIXELS * c;
        data.par_chunks_mut(chunk).enumerate().for_each(|(i, part)| {
            let res = residual.map(|r| &r[i * chunk..i * chunk + part.len()]);
            norm.apply(part, res, |_, _| {});
        });
    }
}

/// [`instance_norm`] in place, whose result is also written, rounded to bf16, into a padded copy
/// ready for the next AMX convolution (as the tests' `pad_bf16` makes it): one pass over the
/// activation instead of a norm and then a copy.
pub fn instance_norm_bf16(
    x: &mut Nhwc,
    affine: Option<(&[f32], &[f32])>,
    after: After,
    (before, pad_after, border, channels): (usize, usize, Border, usize),
) -> Bf16Nhwc {
    assert!(channels >= x.c, "bf16 copy with fewer channels than its source");
    let (c, w) = (x.c, x.w);
    let (out_h, out_w) = (x.h + before + pad_after, x.w + before + pad_after);
    let mut out = Bf16Nhwc::zeros(x.n, out_h, out_w, channels);
    let sample_len = x.sample_len();
    let out_sample = out.sample_len();
    let cols = reflect_indices(x.w, before, pad_after);
    for s in 0..x.n {
        let data = &mut x.data[s * sample_len..(s + 1) * sample_len];
        let norm = Coefficients::of(data, c, affine);
        let residual = after.residual_of(s, sample_len);
        let rows = &mut out.data[s * out_sample..(s + 1) * out_sample];
        let (_, interior) = rows.split_at_mut(before * out_w * channels);
        interior.par_chunks_mut(out_w * channels).zip(data.par_chunks_mut(w * c)).enumerate().for_each(
            |(y, (line, row))| {
                let res = residual.map(|r| &r[y * w * c..(y + 1) * w * c]);
                norm.apply(row, res, |pixel, values| {
                    let dst = &mut line[(before + pixel) * channels..][..c];
                    for (d, v) in dst.iter_mut().zip(values) {
                        *d = bf16(*v);
                    }
                });
                if border == Border::Reflect {
                    for xo in (0..before).chain(before + w..out_w) {
                        let from = (before + cols[xo] as usize) * channels;
                        line.copy_within(from..from + channels, xo * channels);
                    }
                }
            },
        );
        if border == Border::Reflect {
            let row_len = out_w * channels;
            for (yo, sy) in reflect_indices(x.h, before, pad_after).into_iter().enumerate() {
                if yo < before || yo >= before + x.h {
                    rows.copy_within(
                        (before + sy as usize) * row_len..(before + sy as usize + 1) * row_len,
                        yo * row_len,
                    );
                }
            }
        }
    }
    out
}

/// One sample's instance norm, its affine parameters folded in: y = (x − centre)·scale + shift.
struct Coefficients {
    centre: Vec<f32>,
    scale: Vec<f32>,
    shift: Vec<f32>,
}

impl Coefficients {
    /// From one sample's N×C values: sums and sums of squares in f64 over fixed chunks, added in
    /// order (the variance E[x²] − mean², which f64 keeps exact enough at these sizes).
    fn of(data: &[f32], c: usize, affine: Option<(&[f32], &[f32])>) -> Self {
        let plane = (data.len() / c) as f64;
        let (sums, squares) = data
            .par_chunks(NORM_CHUNK_PIXELS * c)
            .map(|part| {
                let (mut sum, mut square) = (vec![0f64; c], vec![0f64; c]);
                for pixel in part.chunks_exact(c) {
                    for ((s, q), v) in sum.iter_mut().zip(square.iter_mut()).zip(pixel) {
                        let v = *v as f64;
                        *s += v;
                        *q += v * v;
                    }
                }
                (sum, square)
            })
            .collect::<Vec<_>>()
            .into_iter()
            .fold((vec![0f64; c], vec![0f64; c]), |(a, b), (s, q)| (add(a, s), add(b, q)));
        let mut norm = Self { centre: vec![0.0; c], scale: vec![0.0; c], shift: vec![0.0; c] };
        for ch in 0..c {
            let mean = sums[ch] / plane;
            let variance = (squares[ch] / plane - mean * mean).max(0.0);
            let inv = 1.0 / (variance + NORM_EPS).sqrt();
            let (gamma, beta) = affine.map_or((1.0, 0.0), |(g, b)| (g[ch] as f64, b[ch] as f64));
            norm.centre[ch] = mean as f32;
            norm.scale[ch] = (inv * gamma) as f32;
            norm.shift[ch] = beta as f32;
        }
        norm
    }

    /// Normalises `part` (whole pixels) in place, then ReLU, or adds `residual` (no
    /// activation); hands each finished pixel to `done` with its index in `part`.
    fn apply(&self, part: &mut [f32], residual: Option<&[f32]>, mut done: impl FnMut(usize, &[f32])) {
        let c = self.centre.len();
        let coefficients = self.centre.iter().zip(&self.scale).zip(&self.shift);
        match residual {
            None => {
                for (p, pixel) in part.chunks_exact_mut(c).enumerate() {
                    for (v, ((m, a), b)) in pixel.iter_mut().zip(coefficients.clone()) {
                        *v = ((*v - m) * a + b).max(0.0);
                    }
                    done(p, pixel);
                }
            }
            Some(residual) => {
                for (p, (pixel, r)) in part.chunks_exact_mut(c).zip(residual.chunks_exact(c)).enumerate() {
                    for ((v, ((m, a), b)), r) in pixel.iter_mut().zip(coefficients.clone()).zip(r) {
                        *v = (*v - m) * a + b + r;
                    }
                    done(p, pixel);
                }
            }
        }
    }
}

fn add(mut a: Vec<f64>, b: Vec<f64>) -> Vec<f64> {
    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
    a
}
