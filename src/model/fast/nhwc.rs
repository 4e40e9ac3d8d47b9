//! Channels-last activations, and the padding and norm passes between convolutions.

use rayon::prelude::*;

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
    let (h, w, c) = (x.h + before + after, x.w + before + after, x.c);
    let mut out = Nhwc::zeros(x.n, h, w, c);
    let (rows, cols) = match border {
        Border::Reflect => (reflect_indices(x.h, before, after), reflect_indices(x.w, before, after)),
        Border::Zero => (Vec::new(), Vec::new()),
    };
    out.data.par_chunks_mut(w * c).enumerate().for_each(|(row_index, row)| {
        let (sample, y) = (row_index / h, row_index % h);
        let src_y = match border {
            Border::Reflect => rows[y] as usize,
            Border::Zero if y < before || y >= before + x.h => return,
            Border::Zero => y - before,
        };
        let src = &x.data[sample * x.sample_len() + src_y * x.w * c..][..x.w * c];
        row[before * c..(before + x.w) * c].copy_from_slice(src);
        if border == Border::Reflect {
            for xo in (0..before).chain(before + x.w..w) {
                let sx = cols[xo] as usize;
                row[xo * c..(xo + 1) * c].copy_from_slice(&src[sx * c..(sx + 1) * c]);
            }
        }
    });
    out
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

/// Pixels per partial sum of the instance-norm statistics. Fixed, so that how the sums are
/// split, and therefore their rounding, depends neither on the thread count nor on the batch;
/// small, so that even the 64×64 planes of the residual blocks spread over 16 threads.
const NORM_CHUNK_PIXELS: usize = 256;

/// Instance norm (biased variance, eps 1e-5, optional scale and shift) per sample and channel,
/// then ReLU or a residual add, in place. Statistics are accumulated in f64, over fixed chunks
/// added in order: every run gives the same bits whatever the scheduling.
pub fn instance_norm(x: &mut Nhwc, affine: Option<(&[f32], &[f32])>, after: After) {
    let (c, plane) = (x.c, x.h * x.w);
    let sample_len = x.sample_len();
    for s in 0..x.n {
        let data = &mut x.data[s * sample_len..(s + 1) * sample_len];
        let chunk = NORM_CHUNK_PIXELS * c;
        let sums = data
            .par_chunks(chunk)
            .map(|part| {
                let mut sum = vec![0f64; c];
                for pixel in part.chunks(c) {
                    for (acc, v) in sum.iter_mut().zip(pixel) {
                        *acc += *v as f64;
                    }
                }
                sum
            })
            .collect::<Vec<_>>()
            .into_iter()
            .fold(vec![0f64; c], add);
        let mean: Vec<f64> = sums.iter().map(|s| s / plane as f64).collect();
        let squares = data
            .par_chunks(chunk)
            .map(|part| {
                let mut sum = vec![0f64; c];
                for pixel in part.chunks(c) {
                    for ((acc, v), m) in sum.iter_mut().zip(pixel).zip(&mean) {
                        let d = *v as f64 - m;
                        *acc += d * d;
                    }
                }
                sum
            })
            .collect::<Vec<_>>()
            .into_iter()
            .fold(vec![0f64; c], add);
        // y = (x − mean) · scale + shift, with the norm's own affine parameters folded in.
        let centre: Vec<f32> = mean.iter().map(|m| *m as f32).collect();
        let mut scale = vec![0f32; c];
        let mut shift = vec![0f32; c];
        for ch in 0..c {
            let inv = 1.0 / (squares[ch] / plane as f64 + NORM_EPS).sqrt();
            let (gamma, beta) = affine.map_or((1.0, 0.0), |(g, b)| (g[ch] as f64, b[ch] as f64));
            scale[ch] = (inv * gamma) as f32;
            shift[ch] = beta as f32;
        }
        let residual = match after {
            After::Residual(r) => Some(&r.data[s * sample_len..(s + 1) * sample_len]),
            After::Relu => None,
        };
        data.par_chunks_mut(chunk).enumerate().for_each(|(i, part)| match residual {
            None => {
                for pixel in part.chunks_mut(c) {
                    for (((v, m), a), b) in pixel.iter_mut().zip(&centre).zip(&scale).zip(&shift) {
                        *v = ((*v - m) * a + b).max(0.0);
                    }
                }
            }
            Some(residual) => {
                let res = &residual[i * chunk..i * chunk + part.len()];
                for (pixel, r) in part.chunks_mut(c).zip(res.chunks(c)) {
                    for ((((v, m), a), b), r) in pixel.iter_mut().zip(&centre).zip(&scale).zip(&shift).zip(r)
                    {
                        *v = (*v - m) * a + b + r;
                    }
                }
            }
        });
    }
}

fn add(mut a: Vec<f64>, b: Vec<f64>) -> Vec<f64> {
    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
    a
}
