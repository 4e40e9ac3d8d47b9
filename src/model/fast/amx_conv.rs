//! Convolutions on AMX bf16 tiles: the same taps as a [`GemmConv`], with bf16 inputs and
//! weights and f32 sums.
//!
//! Output pixels go in runs of 32 along a row (two tiles of 16), output channels in pairs of
//! 16-column tiles. A tile's rows are read straight from the channels-last input image, one
//! pixel's channels per row, `stride` pixels apart: no patch matrix is built. The image carries
//! its channels padded with zeros to a multiple of 32 (one tile row), which the weights match
//! with rows of zeros.

use rayon::prelude::*;

use super::gemm_conv::GemmConv;
use super::nhwc::{Bf16Nhwc, Nhwc};
use crate::model::amx::{multiply, ATiles, Amx, Block, PackedB, Sums, ACC_VALUES, TILE_DEPTH, TILE_ROWS};

/// Output pixels per block: two tiles of rows.
const RUN: usize = 2 * TILE_ROWS;

#[derive(Clone, Debug)]
pub struct AmxConv {
    taps: Vec<(usize, usize)>,
    stride: usize,
    /// Channels of the input image as it is stored: the layer's own, padded to 32s.
    channels: usize,
    cout: usize,
    /// [taps·channels, cout] in tiles, with the bias.
    weight: PackedB,
}

impl AmxConv {
    /// The bf16 twin of `conv`.
    pub fn new(conv: &GemmConv) -> Self {
        let (cin, cout, taps) = (conv.cin(), conv.cout(), conv.taps().to_vec());
        let channels = Self::stored_channels(cin);
        let weight = PackedB::new(taps.len() * channels, cout, |k, o| {
            let (t, c) = (k / channels, k % channels);
            if c < cin {
                conv.weight()[(t * cin + c) * cout + o]
            } else {
                0.0
            }
        })
        .with_bias(conv.bias());
        Self { taps, stride: conv.stride(), channels, cout, weight }
    }

    /// How many channels the bf16 input image of a layer with `cin` inputs carries.
    pub fn stored_channels(cin: usize) -> usize {
        cin.next_multiple_of(TILE_DEPTH)
    }

    /// The channels its input image must carry (see [`AmxConv::stored_channels`]).
    pub fn channels(&self) -> usize {
        self.channels
    }

    pub fn cout(&self) -> usize {
        self.cout
    }

    /// Output size for an input of `h`×`w`.
    pub fn output_size(&self, h: usize, w: usize) -> (usize, usize) {
        super::gemm_conv::output_size(&self.taps, self.stride, h, w)
    }

    pub fn forward(&self, amx: Amx, x: &Bf16Nhwc) -> Nhwc {
        let (out_h, out_w) = self.output_size(x.h, x.w);
        let mut y = Nhwc::zeros(x.n, out_h, out_w, self.cout);
        let row_len = out_w * self.cout;
        y.data.par_chunks_mut(row_len).enumerate().for_each_init(
            || Box::new([0f32; 4 * ACC_VALUES]),
            |block, (row_index, out_row)| {
                let output = Output { row: out_row, first: 0, pixel_stride: self.cout };
                self.row(amx, x, (row_index / out_h, row_index % out_h), out_w, output, block);
            },
        );
        y
    }

    /// Output row `oy` of sample `s`, `out_w` pixels, into `output`.
    pub fn row(
        &self,
        amx: Amx,
        x: &Bf16Nhwc,
        (s, oy): (usize, usize),
        out_w: usize,
        output: Output<'_>,
        block: &mut Block,
    ) {
        assert_eq!(x.c, self.channels, "amx conv: channel count");
        let (max_h, max_w) = self.output_size(x.h, x.w);
        assert!(oy < max_h && out_w <= max_w, "amx conv: output larger than the input allows");
        let (c, stride) = (self.channels, self.stride);
        // Each depth step's offset from a tile's first row: a tap's pixel and a group of 32 of
        // its channels.
        let steps: Vec<usize> = self
            .taps
            .iter()
            .flat_map(|&(dy, dx)| (0..c).step_by(TILE_DEPTH).map(move |c0| (dy * x.w + dx) * c + c0))
            .collect();
        let tiles = ATiles::new(&x.data, stride * c, &steps);
        let Output { row, first: offset, pixel_stride } = output;
        for first in (0..out_w).step_by(RUN) {
            let pixels = (out_w - first).min(RUN);
            let start = s * x.sample_len() + (stride * oy * x.w + stride * first) * c;
            let starts = [start, start + TILE_ROWS * stride * c];
            let out = Output { row: &mut *row, first: offset + first * pixel_stride, pixel_stride };
            self.run(amx, &tiles, starts, pixels, block, out);
        }
    }

    /// One run of `pixels` output pixels, every output channel. Whole blocks are stored straight
    /// into the output; a block that runs past the run's pixels or the channels goes through
    /// `block`.
    fn run(
        &self,
        amx: Amx,
        tiles: &ATiles<'_>,
        starts: [usize; 2],
        pixels: usize,
        block: &mut Block,
        out: Output<'_>,
    ) {
        let (cout, n_tiles, w) = (self.cout, self.weight.n_tiles(), &self.weight);
        let Output { row, first, pixel_stride } = out;
        let rows = if pixels > TILE_ROWS { 2 } else { 1 };
        for col_tile in (0..n_tiles).step_by(2) {
            let cols = if col_tile + 1 < n_tiles { 2 } else { 1 };
            let whole = pixels == rows * TILE_ROWS && (col_tile + cols) * TILE_ROWS <= cout;
            let sums = if whole {
                Sums::Matrix {
                    data: &mut *row,
                    offset: first + col_tile * TILE_ROWS,
                    row_stride: pixel_stride,
                }
            } else {
                Sums::Block(&mut *block)
            };
            match (rows, cols) {
                (2, 2) => multiply::<2, 2>(amx, tiles, starts, w, [col_tile, col_tile + 1], sums),
                (2, _) => multiply::<2, 1>(amx, tiles, starts, w, [col_tile], sums),
                (_, 2) => multiply::<1, 2>(amx, tiles, [starts[0]], w, [col_tile, col_tile + 1], sums),
                _ => multiply::<1, 1>(amx, tiles, [starts[0]], w, [col_tile], sums),
            }
            if !whole {
                let columns = col_tile * TILE_ROWS..((col_tile + 2) * TILE_ROWS).min(cout);
                for p in 0..pixels {
                    let pixel = &mut row[first + p * pixel_stride..][..cout];
                    let row_tile = &block[(p / TILE_ROWS) * 2 * ACC_VALUES + (p % TILE_ROWS) * TILE_ROWS..];
                    for o in columns.clone() {
                        pixel[o] = row_tile[(o / TILE_ROWS - col_tile) * ACC_VALUES + o % TILE_ROWS];
                    }
                }
            }
        }
    }
}

/// Where a row of outputs goes: pixel `p`'s channels at `first + p·pixel_stride` of `row`
/// (`pixel_stride` is the channel count for a plain row, twice it for one phase of an
/// interleaved one).
#[derive(Debug)]
pub struct Output<'a> {
    pub row: &'a mut [f32],
    pub first: usize,
    pub pixel_stride: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::amx::{bf16, f32_of};
    use crate::model::fast::nhwc::{pad_bf16, Border};

    /// Deterministic values in [-1, 1), already bf16, so that the f32 reference sees exactly
    /// what the tiles see and only the order of the f32 sums differs.
    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len).map(|i| f32_of(bf16((((i + seed) * 2654435761) % 4096) as f32 / 2048.0 - 1.0))).collect()
    }

    /// Channel counts that are and are not multiples of 32 (the bf16 copy pads them), every
    /// block shape (runs of ≤ 16 and 17–31 pixels, odd column tiles), strides 1 and 2.
    #[test]
    fn matches_the_f32_convolution_of_the_same_bf16_values_on_odd_shapes() {
        let Some(amx) = Amx::detect() else {
            eprintln!("no AMX on this machine: the AMX convolution is not exercised");
            return;
        };
        // (cin, cout, kernel, stride, input h, input w)
        let cases = [
            (3, 20, 7, 1, 13, 45),
            (32, 48, 3, 2, 9, 71),
            (48, 3, 7, 1, 8, 20),
            (64, 40, 3, 1, 5, 37),
            (96, 16, 1, 1, 3, 17),
        ];
        for (case, &(cin, cout, k, stride, h, w)) in cases.iter().enumerate() {
            let weight = values(cout * cin * k * k, case);
            let bias = values(cout, case + 7);
            let reference = GemmConv::conv(&weight, &bias, cout, cin, k, stride);
            let x = Nhwc { n: 2, h, w, c: cin, data: values(2 * h * w * cin, case + 11) };
            let expected = reference.forward(&x);
            let conv = AmxConv::new(&reference);
            let got = conv.forward(amx, &pad_bf16(&x, 0, 0, Border::Zero, conv.channels()));
            assert_eq!((got.n, got.h, got.w, got.c), (expected.n, expected.h, expected.w, expected.c));
            let scale = expected.data.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = got.data.iter().zip(&expected.data).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                worst <= 1e-5 * scale,
                "case {case}: largest difference {worst:e} against values up to {scale}"
            );
        }
    }
}
