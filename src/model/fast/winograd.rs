//! 3×3 stride-1 convolution by Winograd's minimal filtering F(4×4, 3×3) (Lavin & Gray, "Fast
//! Algorithms for Convolutional Neural Networks", 2016): each 4×4 output tile costs 36
//! multiply-adds per input/output channel pair instead of 144. Tiles are transformed in blocks,
//! the 36 products of a block are GEMMs over channels, and blocks run in parallel.

use rayon::prelude::*;

use super::nhwc::Nhwc;
use crate::model::gemm::{matmul, Mat, MatMut, Threads};

/// Output tile side; input tiles are `TILE + 2` on a side.
const TILE: usize = 4;
const POINTS: usize = 36;
/// Aim for about this many tiles per block: enough rows for the GEMMs, few enough to stay in cache.
const TILES_PER_BLOCK: usize = 64;

/// G of F(4×4, 3×3): spreads a 3-tap kernel row over the 6 transform points.
pub(crate) const G: [[f64; 3]; 6] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// A 3×3 convolution (stride 1, no padding of its own: its input comes padded) with weights
/// transformed once, at load time.
#[derive(Clone, Debug)]
pub struct WinogradConv {
    cin: usize,
    cout: usize,
    /// U[point][cin][cout] = (G g Gᵀ)[point] for each (cout, cin) kernel g.
    u: Vec<f32>,
    bias: Vec<f32>,
}

impl WinogradConv {
    /// `weight` is PyTorch's [cout, cin, 3, 3].
    pub fn new(weight: &[f32], bias: &[f32], cout: usize, cin: usize) -> Self {
        let mut u = vec![0f32; POINTS * cin * cout];
        for o in 0..cout {
            for i in 0..cin {
                let g = &weight[(o * cin + i) * 9..][..9];
                for a in 0..6 {
                    for b in 0..6 {
                        let mut v = 0f64;
                        for r in 0..3 {
                            for s in 0..3 {
                                v += G[a][r] * g[r * 3 + s] as f64 * G[b][s];
                            }
                        }
                        u[((a * 6 + b) * cin + i) * cout + o] = v as f32;
                    }
                }
            }
        }
        Self { cin, cout, u, bias: bias.to_vec() }
    }

    /// How a layer's tiles are blocked: `rows` tile rows per parallel band (several when the
    /// image is narrow), each band processed `cols` tiles at a time, so the scratch stays near
    /// [`TILES_PER_BLOCK`] tiles whatever the aspect ratio.
    fn blocking(tiles_y: usize, tiles_x: usize) -> (usize, usize) {
        let cols = tiles_x.min(TILES_PER_BLOCK);
        let rows = TILES_PER_BLOCK.div_ceil(tiles_x).clamp(1, tiles_y.max(1));
        (rows, cols)
    }

    /// Per-thread scratch, in floats, for an output `out_h`×`out_w`.
    pub fn scratch_floats(cin: usize, cout: usize, out_h: usize, out_w: usize) -> usize {
        let (rows, cols) = Self::blocking(out_h.div_ceil(TILE), out_w.div_ceil(TILE));
        Scratch::floats(rows * cols, cin, cout)
    }

    /// Convolves an input already padded by one pixel: (H+2)×(W+2) in, H×W out.
    pub fn forward(&self, x: &Nhwc) -> Nhwc {
        assert_eq!(x.c, self.cin, "winograd: channel count");
        let (out_h, out_w) = (x.h - 2, x.w - 2);
        let (tiles_y, tiles_x) = (out_h.div_ceil(TILE), out_w.div_ceil(TILE));
        let (rows_per_band, cols_per_block) = Self::blocking(tiles_y, tiles_x);
        let mut y = Nhwc::zeros(x.n, out_h, out_w, self.cout);
        let out_sample = out_h * out_w * self.cout;
        // Each band owns whole output rows: TILE rows per tile row, so bands write disjoint data.
        let band_len = rows_per_band * TILE * out_w * self.cout;
        y.data
            .par_chunks_mut(out_sample)
            .enumerate()
            .flat_map(|(s, sample)| {
                sample.par_chunks_mut(band_len).enumerate().map(move |(b, out)| (s, b, out))
            })
            .for_each_init(
                || Scratch::new(rows_per_band * cols_per_block, self.cin, self.cout),
                |scratch, (s, b, out)| {
                    let first_row = b * rows_per_band;
                    let rows = rows_per_band.min(tiles_y - first_row);
                    for first_col in (0..tiles_x).step_by(cols_per_block) {
                        let tiles = TileBlock {
                            first_row,
                            rows,
                            first_col,
                            cols: cols_per_block.min(tiles_x - first_col),
                        };
                        self.block(x, s, tiles, scratch, out);
                    }
                },
            );
        y
    }

    /// Input transform, 36 GEMMs and output transform for one block of tiles; `out` is the
    /// band of output rows the block lies in.
    fn block(&self, x: &Nhwc, sample: usize, block: TileBlock, scratch: &mut Scratch, out: &mut [f32]) {
        let (cin, cout) = (self.cin, self.cout);
        let tiles = block.rows * block.cols;
        let input = &x.data[sample * x.sample_len()..][..x.sample_len()];
        for t in 0..tiles {
            let (ty, tx) = (block.first_row + t / block.cols, block.first_col + t % block.cols);
            let origin = (TILE * ty, TILE * tx);
            input_transform(
                input,
                (x.h, x.w, cin),
                origin,
                &scratch.zeros,
                &mut scratch.tmp,
                &mut scratch.v,
                t,
                tiles,
            );
        }
        for p in 0..POINTS {
            let v = Mat::new(&scratch.v[p * tiles * cin..], tiles, cin, cin);
            let u = Mat::new(&self.u[p * cin * cout..], cin, cout, cout);
            let m = MatMut::new(&mut scratch.m[p * tiles * cout..], tiles, cout, cout);
            matmul(m, false, v, u, Threads::One);
        }
        let out_w = x.w - 2;
        let out_rows = out.len() / (out_w * cout);
        for t in 0..tiles {
            // Rows relative to the band, columns absolute.
            let (ty, tx) = (t / block.cols, block.first_col + t % block.cols);
            let place = |r: usize, c: usize| {
                let (oy, ox) = (TILE * ty + r, TILE * tx + c);
                (oy < out_rows && ox < out_w).then_some((oy * out_w + ox) * cout)
            };
            output_transform(
                &scratch.m,
                t,
                tiles,
                cout,
                &self.bias,
                &mut scratch.tmp,
                &mut scratch.row,
                place,
                out,
            );
        }
    }
}

/// A rectangle of tiles: tile rows `first_row..+rows`, tile columns `first_col..+cols`.
#[derive(Clone, Copy)]
struct TileBlock {
    first_row: usize,
    rows: usize,
    first_col: usize,
    cols: usize,
}

/// Per-thread buffers: transformed inputs V[point][tile][cin], products M[point][tile][cout],
/// one tile's intermediate vectors, and a zero pixel for reads past the border.
struct Scratch {
    v: Vec<f32>,
    m: Vec<f32>,
    tmp: Vec<f32>,
    row: Vec<f32>,
    zeros: Vec<f32>,
}

impl Scratch {
    /// The floats [`Scratch::new`] allocates.
    fn floats(tiles: usize, cin: usize, cout: usize) -> usize {
        POINTS * tiles * (cin + cout) + POINTS * cin.max(cout) + 4 * cout + cin
    }

    fn new(tiles: usize, cin: usize, cout: usize) -> Self {
        Self {
            v: vec![0.0; POINTS * tiles * cin],
            m: vec![0.0; POINTS * tiles * cout],
            tmp: vec![0.0; POINTS * cin.max(cout)],
            row: vec![0.0; 4 * cout],
            zeros: vec![0.0; cin],
        }
    }
}

/// Bᵀ applied to six vectors (one per transform point), channel by channel.
#[inline(always)]
fn bt(d: [&[f32]; 6], out: [&mut [f32]; 6]) {
    let [o0, o1, o2, o3, o4, o5] = out;
    for c in 0..o0.len() {
        let (d0, d1, d2, d3, d4, d5) = (d[0][c], d[1][c], d[2][c], d[3][c], d[4][c], d[5][c]);
        o0[c] = 4.0 * d0 - 5.0 * d2 + d4;
        o1[c] = -4.0 * (d1 + d2) + d3 + d4;
        o2[c] = 4.0 * (d1 - d2) - d3 + d4;
        o3[c] = 2.0 * (d3 - d1) - d2 + d4;
        o4[c] = 2.0 * (d1 - d3) - d2 + d4;
        o5[c] = 4.0 * d1 - 5.0 * d3 + d5;
    }
}

/// `N` disjoint `c`-long chunks of `buf`: chunk indices `start`, `start + step`, …
fn chunks_at<const N: usize>(buf: &mut [f32], c: usize, start: usize, step: usize) -> [&mut [f32]; N] {
    let mut chunks = buf.chunks_mut(c).skip(start).step_by(step);
    std::array::from_fn(|_| chunks.next().expect("chunk inside the buffer"))
}

/// V = Bᵀ d B for the 6×6 input tile at (y0, x0) of a padded sample (reads outside are zero),
/// written to V[point][t] of a block of `tiles`. `tmp` holds 36 channel vectors.
#[allow(clippy::too_many_arguments)]
fn input_transform(
    input: &[f32],
    (h, w, c): (usize, usize, usize),
    (y0, x0): (usize, usize),
    zeros: &[f32],
    tmp: &mut [f32],
    v: &mut [f32],
    t: usize,
    tiles: usize,
) {
    let pixel = |y: usize, x: usize| -> &[f32] {
        if y < h && x < w {
            &input[(y * w + x) * c..][..c]
        } else {
            zeros
        }
    };
    // Columns first: tmp[i][j] = Σₖ Bᵀ[i][k] d[k][j].
    for j in 0..6 {
        bt([0, 1, 2, 3, 4, 5].map(|k| pixel(y0 + k, x0 + j)), chunks_at(tmp, c, j, 6));
    }
    // Then rows: V[i][j] = Σₖ tmp[i][k] B[k][j].
    for i in 0..6 {
        let row: [&[f32]; 6] = [0, 1, 2, 3, 4, 5].map(|k| &tmp[(i * 6 + k) * c..][..c]);
        bt(row, chunks_at(v, c, i * 6 * tiles + t, tiles));
    }
}

/// Aᵀ applied to six vectors, giving four.
#[inline(always)]
fn at(m: [&[f32]; 6], out: [&mut [f32]; 4]) {
    let [o0, o1, o2, o3] = out;
    for c in 0..o0.len() {
        let (m0, m1, m2, m3, m4, m5) = (m[0][c], m[1][c], m[2][c], m[3][c], m[4][c], m[5][c]);
        let (s12, d12, s34, d34) = (m1 + m2, m1 - m2, m3 + m4, m3 - m4);
        o0[c] = m0 + s12 + s34;
        o1[c] = d12 + 2.0 * d34;
        o2[c] = s12 + 4.0 * s34;
        o3[c] = d12 + 8.0 * d34 + m5;
    }
}

/// Y = Aᵀ M A + bias for tile `t` of a block, written where `place(r, c)` says (None: the
/// position lies outside the image). `tmp` holds 24 channel vectors, `row` 4.
#[allow(clippy::too_many_arguments)]
fn output_transform(
    m: &[f32],
    t: usize,
    tiles: usize,
    c: usize,
    bias: &[f32],
    tmp: &mut [f32],
    row: &mut [f32],
    place: impl Fn(usize, usize) -> Option<usize>,
    out: &mut [f32],
) {
    // Columns first: tmp[r][j] = Σₖ Aᵀ[r][k] M[k][j].
    for j in 0..6 {
        let col = [0, 1, 2, 3, 4, 5].map(|k| &m[((k * 6 + j) * tiles + t) * c..][..c]);
        at(col, chunks_at(tmp, c, j, 6));
    }
    for r in 0..4 {
        let line = [0, 1, 2, 3, 4, 5].map(|k| &tmp[(r * 6 + k) * c..][..c]);
        at(line, chunks_at(row, c, 0, 1));
        for (s, values) in row.chunks(c).enumerate() {
            if let Some(offset) = place(r, s) {
                for ((o, v), b) in out[offset..offset + c].iter_mut().zip(values).zip(bias) {
                    *o = v + b;
                }
            }
        }
    }
}
