//! The training graph's 3×3 stride-1 convolutions by Winograd F(4×4, 3×3), channels-first.
//!
//! [`super::conv`] computes every convolution product as im2col + GEMM; for a 3×3 stride-1
//! kernel that is 9 multiply-adds per output pixel and channel pair, where F(4×4, 3×3) needs 36
//! per 4×4 tile, 2.25 per pixel. This module serves all three products:
//!
//! - the forward convolution, zero padding 0 or 1 (the residual blocks pad by reflection first);
//! - the input gradient, which for stride 1 is itself a stride-1 convolution: the output
//!   gradient padded by `2 − pad`, correlated with each kernel rotated by 180° and the channel
//!   roles swapped. Only the weight transform differs;
//! - the weight gradient, the forward's exact transpose in the weights: the output gradient's
//!   4×4 tiles are taken to the transform domain by A (the transpose of the output transform
//!   Aᵀ), multiplied point by point with the forward's transformed input tiles and summed over
//!   tiles (36 GEMMs whose inner dimension is the tiles), and the sums brought back to 3×3
//!   kernels by Gᵀ.
//!
//! Unlike the inference executor's [`crate::model::fast`] Winograd (channels-last, weights
//! transformed once at load), this one reads and writes NCHW planes directly and transforms the
//! weights on every call, since training changes them every step. Per block of tile rows the
//! tile transforms run in parallel over channels, the 36 point-wise GEMMs in parallel over
//! points, and the output transform in parallel over output channels; every output element is
//! computed by one thread in a fixed order (the weight gradient's sums: block by block, sample by
//! sample), so results do not depend on the thread count.

use std::ops::Range;

use rayon::prelude::*;

use super::gemm::{matmul, Mat, MatMut, Threads};
use super::scratch::Scratch;

/// Output tile side; an input tile is `TILE + 2` on a side.
const TILE: usize = 4;
/// Side of a transformed tile.
const SIDE: usize = TILE + 2;
/// Points of a transformed tile.
const POINTS: usize = SIDE * SIDE;
/// Budget for one block's transformed inputs and products, in floats (8 MiB): enough tiles for
/// long GEMM rows, little enough that a block stays in the last-level cache.
const BLOCK_FLOATS: usize = 2 << 20;

/// Smallest channel count (of either side) for which Winograd beats im2col + GEMM: below it the
/// transforms, not the products, dominate (16→16 at 64²: forward 0.94×; 32→32: 1.29×). Measured
/// with `cargo bench --bench bench -- conv3x3` on 2 cores; see BENCHMARKS.md.
const MIN_CHANNELS: usize = 32;
/// Smallest output side for which it wins: on smaller planes the per-block fixed costs (36
/// short GEMMs, three parallel passes) dominate (64→64 at 16²: forward 0.64×; at 32²: 1.08×).
const MIN_OUTPUT_SIDE: usize = 32;

/// Whether a 3×3 stride-1 product with these channels and output plane is faster by Winograd.
/// One rule serves all three products: the weight gradient, measured alone, wins on the same
/// shapes (and also at 16→16 on 64², 2.5×, a width no trained layer has) and loses on the same
/// small planes (32→32 at 8²: 0.5×; 64→64 at 16²: 1.0×).
pub fn worthwhile(in_channels: usize, out_channels: usize, (out_h, out_w): (usize, usize)) -> bool {
    in_channels.min(out_channels) >= MIN_CHANNELS && out_h.min(out_w) >= MIN_OUTPUT_SIDE
}

/// The shape of one stride-1 3×3 correlation over a batch of NCHW planes.
#[derive(Clone, Copy, Debug)]
struct Plan {
    batch: usize,
    in_channels: usize,
    out_channels: usize,
    in_h: usize,
    in_w: usize,
    /// Zero padding on every side.
    pad: usize,
    out_h: usize,
    out_w: usize,
    tiles_x: usize,
    tiles_y: usize,
}

impl Plan {
    fn new(
        batch: usize,
        (in_channels, out_channels): (usize, usize),
        (in_h, in_w): (usize, usize),
        pad: usize,
    ) -> Self {
        assert!(in_h + 2 * pad >= 3 && in_w + 2 * pad >= 3, "winograd: input smaller than the kernel");
        let (out_h, out_w) = (in_h + 2 * pad - 2, in_w + 2 * pad - 2);
        let (tiles_y, tiles_x) = (out_h.div_ceil(TILE), out_w.div_ceil(TILE));
        Self { batch, in_channels, out_channels, in_h, in_w, pad, out_h, out_w, tiles_x, tiles_y }
    }

    /// Tile rows per block: as few blocks as [`BLOCK_FLOATS`] allows (a block holds at least
    /// one tile row), of even sizes.
    fn block_rows(&self) -> usize {
        let per_row = POINTS * self.tiles_x * (self.in_channels + self.out_channels);
        let most = (BLOCK_FLOATS / per_row).clamp(1, self.tiles_y);
        self.tiles_y.div_ceil(self.tiles_y.div_ceil(most))
    }

    /// The blocks of tile rows, in order.
    fn blocks(&self) -> impl Iterator<Item = Range<usize>> {
        let (step, end) = (self.block_rows(), self.tiles_y);
        (0..end).step_by(step).map(move |first| first..(first + step).min(end))
    }

    /// Tiles in the largest block.
    fn max_block_tiles(&self) -> usize {
        self.block_rows() * self.tiles_x
    }

    fn in_plane(&self) -> usize {
        self.in_h * self.in_w
    }

    fn out_plane(&self) -> usize {
        self.out_h * self.out_w
    }
}

/// y = conv(x, w): `x` is [batch, cin, h, w], `w` PyTorch's [cout, cin, 3, 3], zero padding
/// `pad`; returns [batch, cout, h + 2·pad − 2, w + 2·pad − 2].
pub fn forward(
    x: &[f32],
    w: &[f32],
    batch: usize,
    (cin, cout): (usize, usize),
    (h, wd): (usize, usize),
    pad: usize,
) -> Vec<f32> {
    let plan = Plan::new(batch, (cin, cout), (h, wd), pad);
    correlate(x, &transform_weights(w, cout, cin, Orientation::Forward), &plan)
}

/// dx of `forward` for output gradient `dy` ([batch, cout, out_h, out_w]): the full correlation
/// of `dy` (padded by `2 − pad`) with the rotated, channel-swapped kernels; returns [batch, cin,
/// h, w] for the forward input size `(h, w)`.
pub fn input_grad(
    dy: &[f32],
    w: &[f32],
    batch: usize,
    (cin, cout): (usize, usize),
    (h, wd): (usize, usize),
    pad: usize,
) -> Vec<f32> {
    assert!(pad <= 2, "winograd: input gradient needs padding of at most 2");
    let plan = Plan::new(batch, (cout, cin), (h + 2 * pad - 2, wd + 2 * pad - 2), 2 - pad);
    debug_assert_eq!((plan.out_h, plan.out_w), (h, wd));
    correlate(dy, &transform_weights(w, cout, cin, Orientation::InputGrad), &plan)
}

/// dw of `forward` for input `x` ([batch, cin, h, w]) and output gradient `dy` ([batch, cout,
/// out_h, out_w]); returns PyTorch's [cout, cin, 3, 3].
///
/// The exact transpose of `forward` in the weights: with y = Aᵀ[(G g Gᵀ) ⊙ V]A per tile,
/// dg = Gᵀ[Σ_tiles (A dY Aᵀ) ⊙ V]G. Per block of tile rows, V (as `forward` computes it) and
/// dM = A dY Aᵀ are transformed in parallel over channels, then each of the 36 points adds
/// dM_p · V_pᵀ (cout × cin, summed over the block's tiles) to its dU_p, in parallel over points;
/// each dU_p is summed by one thread, block by block and sample by sample, so the result does not
/// depend on the thread count.
pub fn weight_grad(
    x: &[f32],
    dy: &[f32],
    batch: usize,
    (cin, cout): (usize, usize),
    (h, wd): (usize, usize),
    pad: usize,
) -> Vec<f32> {
    let plan = Plan::new(batch, (cin, cout), (h, wd), pad);
    let (in_sample, out_sample) = (cin * plan.in_plane(), cout * plan.out_plane());
    assert_eq!(x.len(), batch * in_sample, "winograd: input shape");
    assert_eq!(dy.len(), batch * out_sample, "winograd: output gradient shape");
    // dU[point][o][i]
    let mut du = Scratch::new(POINTS * cout * cin);
    let max_tiles = plan.max_block_tiles();
    let mut v = Scratch::new(cin * POINTS * max_tiles);
    let mut dm = Scratch::new(cout * POINTS * max_tiles);
    let mut first = true;
    for (xs, dys) in x.chunks_exact(in_sample).zip(dy.chunks_exact(out_sample)) {
        for rows in plan.blocks() {
            let tiles = rows.len() * plan.tiles_x;
            let (v, dm) = (&mut v[..cin * POINTS * tiles], &mut dm[..cout * POINTS * tiles]);
            // V[c][point][tile], dM[o][point][tile]
            transform_planes(xs, Tiling::input(&plan), rows.clone(), v, bt);
            transform_planes(dys, Tiling::output(&plan), rows, dm, a_transposed);
            let (v, dm) = (&*v, &*dm);
            du.par_chunks_mut(cout * cin).enumerate().for_each(|(p, du)| {
                let dm = Mat::new(&dm[p * tiles..], cout, tiles, POINTS * tiles);
                let vt = Mat::new(&v[p * tiles..], cin, tiles, POINTS * tiles).t();
                matmul(MatMut::new(du, cout, cin, cin), !first, dm, vt, Threads::One);
            });
            first = false;
        }
    }
    untransform_weights(&du, cout, cin)
}

/// How the kernels of a [cout, cin, 3, 3] weight map onto the correlation being computed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Orientation {
    /// Correlation output channel o, input channel c: kernel w[o][c].
    Forward,
    /// Correlation output channel c, input channel o: kernel w[o][c] rotated by 180°.
    InputGrad,
}

// G's fractions, as products with reciprocals in [`g_lines`] and [`gt_lines`]: a division costs
// several times a product, and these run over every weight on every call.
const SIXTH: f32 = 1.0 / 6.0;
const TWELFTH: f32 = 1.0 / 12.0;
const TWENTY_FOURTH: f32 = 1.0 / 24.0;

/// G of F(4×4, 3×3) (Lavin & Gray 2016) applied to 3-tap vectors held as three lines (one per
/// tap, element-wise across kernels), giving the 6 transform points as six lines.
#[inline(always)]
fn g_lines([g0, g1, g2]: [&[f32]; 3], [o0, o1, o2, o3, o4, o5]: [&mut [f32]; SIDE]) {
    let n = g0.len();
    let (g0, g1, g2) = (&g0[..n], &g1[..n], &g2[..n]);
    let (o0, o1, o2, o3, o4, o5) =
        (&mut o0[..n], &mut o1[..n], &mut o2[..n], &mut o3[..n], &mut o4[..n], &mut o5[..n]);
    for k in 0..n {
        let (a, b, c) = (g0[k], g1[k], g2[k]);
        let (outer, middle) = (a * TWENTY_FOURTH + c * SIXTH, b * TWELFTH);
        o0[k] = a * 0.25;
        o1[k] = -(a + b + c) * SIXTH;
        o2[k] = -(a - b + c) * SIXTH;
        o3[k] = outer + middle;
        o4[k] = outer - middle;
        o5[k] = c;
    }
}

/// Gᵀ, the transpose of [`g_lines`]: six transform points held as lines back to three taps.
/// (Multiplied by rounded reciprocals rather than divided: baseline x86-64 divides 4 lanes at a
/// time, and the divisions took a quarter of this pass, 1.1 of 5.7 ms in a 256 → 256 weight
/// gradient on one core.)
#[inline(always)]
fn gt_lines([u0, u1, u2, u3, u4, u5]: [&[f32]; SIDE], [o0, o1, o2]: [&mut [f32]; 3]) {
    let n = u0.len();
    let (u0, u1, u2, u3, u4, u5) = (&u0[..n], &u1[..n], &u2[..n], &u3[..n], &u4[..n], &u5[..n]);
    let (o0, o1, o2) = (&mut o0[..n], &mut o1[..n], &mut o2[..n]);
    for k in 0..n {
        let (s12, d12, s34, d34) = (u1[k] + u2[k], u2[k] - u1[k], u3[k] + u4[k], u3[k] - u4[k]);
        o0[k] = (6.0 * u0[k] - 4.0 * s12 + s34) * TWENTY_FOURTH;
        o1[k] = (2.0 * d12 + d34) * TWELFTH;
        o2[k] = (s34 - s12) * SIXTH + u5[k];
    }
}

/// `N` disjoint `len`-long lines of `buf`: line indices `first`, `first + step`, …
fn lines<const N: usize>(buf: &mut [f32], len: usize, first: usize, step: usize) -> [&mut [f32]; N] {
    let mut lines = buf.chunks_exact_mut(len).skip(first).step_by(step);
    std::array::from_fn(|_| lines.next().expect("line inside the buffer"))
}

/// U = G g Gᵀ for every kernel, laid out U[out][point][in] (a per-point GEMM operand with row
/// stride POINTS·in), in parallel over output channels. Per output channel the kernels' taps are
/// gathered into lines across input channels, so both passes of G run over whole lines.
fn transform_weights(w: &[f32], cout: usize, cin: usize, orientation: Orientation) -> Transformed {
    let (outs, ins) = match orientation {
        Orientation::Forward => (cout, cin),
        Orientation::InputGrad => (cin, cout),
    };
    assert_eq!(w.len(), cout * cin * 9, "winograd: weight shape");
    let mut u = Scratch::new(outs * POINTS * ins);
    u.par_chunks_mut(POINTS * ins).enumerate().for_each_init(Vec::new, |scratch, (a, row)| {
        // taps[r][s][b], then half[s][i][b] = (G · kernel[.., s])[i].
        scratch.resize((9 + 3 * SIDE) * ins, 0.0);
        let (taps, half) = scratch.split_at_mut(9 * ins);
        for b in 0..ins {
            let kernel = match orientation {
                Orientation::Forward => &w[(a * cin + b) * 9..][..9],
                Orientation::InputGrad => &w[(b * cin + a) * 9..][..9],
            };
            for (t, &value) in kernel.iter().enumerate() {
                // A 180° rotation reverses the 9 taps.
                let t = if orientation == Orientation::InputGrad { 8 - t } else { t };
                taps[t * ins + b] = value;
            }
        }
        let tap = |r: usize, s: usize| &taps[(r * 3 + s) * ins..][..ins];
        for s in 0..3 {
            g_lines([tap(0, s), tap(1, s), tap(2, s)], lines(half, ins, s * SIDE, 1));
        }
        let half = &*half;
        for i in 0..SIDE {
            let column = |s: usize| &half[(s * SIDE + i) * ins..][..ins];
            g_lines([column(0), column(1), column(2)], lines(row, ins, i * SIDE, 1));
        }
    });
    Transformed { u, outs, ins }
}

/// dW = Gᵀ dU G for every kernel: the transpose of [`transform_weights`] (forward orientation),
/// from dU[point][o][i] to PyTorch's [cout, cin, 3, 3], in parallel over output channels. Both
/// passes of Gᵀ run over lines across input channels; the taps are scattered at the end.
fn untransform_weights(du: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    assert_eq!(du.len(), POINTS * cout * cin, "winograd: transformed weight gradient shape");
    let mut dw = vec![0f32; cout * cin * 9];
    dw.par_chunks_mut(cin * 9).enumerate().for_each_init(Vec::new, |scratch, (o, kernels)| {
        // half[i][s][b] = (dU[i][..] · G)[s], then taps[r][s][b] = (Gᵀ · half[.., s])[r].
        scratch.resize((3 * SIDE + 9) * cin, 0.0);
        let (half, taps) = scratch.split_at_mut(3 * SIDE * cin);
        let point = |p: usize| &du[(p * cout + o) * cin..][..cin];
        for i in 0..SIDE {
            gt_lines(std::array::from_fn(|j| point(i * SIDE + j)), lines(half, cin, 3 * i, 1));
        }
        let half = &*half;
        for s in 0..3 {
            let column = |i: usize| &half[(3 * i + s) * cin..][..cin];
            gt_lines(std::array::from_fn(column), lines(taps, cin, s, 3));
        }
        for (b, kernel) in kernels.chunks_exact_mut(9).enumerate() {
            for (t, value) in kernel.iter_mut().enumerate() {
                *value = taps[t * cin + b];
            }
        }
    });
    dw
}

/// Transformed weights of one correlation: `outs` × `ins` kernels.
struct Transformed {
    u: Scratch<f32>,
    outs: usize,
    ins: usize,
}

/// The stride-1 3×3 correlation `plan` describes, block of tile rows by block.
fn correlate(x: &[f32], weights: &Transformed, plan: &Plan) -> Vec<f32> {
    let (cin, cout) = (plan.in_channels, plan.out_channels);
    assert_eq!((weights.ins, weights.outs), (cin, cout), "winograd: weight channels");
    let (in_sample, out_sample) = (cin * plan.in_plane(), cout * plan.out_plane());
    assert_eq!(x.len(), plan.batch * in_sample, "winograd: input shape");
    let mut y = vec![0f32; plan.batch * out_sample];
    let max_tiles = plan.max_block_tiles();
    let mut v = Scratch::new(cin * POINTS * max_tiles);
    let mut m = Scratch::new(POINTS * cout * max_tiles);
    for (xs, ys) in x.chunks_exact(in_sample).zip(y.chunks_exact_mut(out_sample)) {
        for rows in plan.blocks() {
            let tiles = rows.len() * plan.tiles_x;
            let (v, m) = (&mut v[..cin * POINTS * tiles], &mut m[..POINTS * cout * tiles]);
            // V[c][point][tile]
            transform_planes(xs, Tiling::input(plan), rows.clone(), v, bt);
            // M[point][o][tile] = Σ_c U[o][point][c] · V[c][point][tile]
            let v = &*v;
            m.par_chunks_mut(cout * tiles).enumerate().for_each(|(p, m)| {
                let u = Mat::new(&weights.u[p * cin..], cout, cin, POINTS * cin);
                let vp = Mat::new(&v[p * tiles..], cin, tiles, POINTS * tiles);
                matmul(MatMut::new(m, cout, tiles, tiles), false, u, vp, Threads::One);
            });
            let m = &*m;
            ys.par_chunks_exact_mut(plan.out_plane())
                .enumerate()
                .for_each_init(Vec::new, |scratch, (o, plane)| {
                    output_transform(m, o, plan, rows.clone(), plane, scratch)
                });
        }
    }
    y
}

/// Bᵀ of F(4×4, 3×3) applied to six samples.
#[inline(always)]
fn bt([d0, d1, d2, d3, d4, d5]: [f32; SIDE]) -> [f32; SIDE] {
    [
        4.0 * d0 - 5.0 * d2 + d4,
        -4.0 * (d1 + d2) + d3 + d4,
        4.0 * (d1 - d2) - d3 + d4,
        2.0 * (d3 - d1) - d2 + d4,
        2.0 * (d1 - d3) - d2 + d4,
        4.0 * d1 - 5.0 * d3 + d5,
    ]
}

/// Aᵀ of F(4×4, 3×3): six transformed samples back to four outputs.
#[inline(always)]
fn at([m0, m1, m2, m3, m4, m5]: [f32; SIDE]) -> [f32; TILE] {
    let (s12, d12, s34, d34) = (m1 + m2, m1 - m2, m3 + m4, m3 - m4);
    [m0 + s12 + s34, d12 + 2.0 * d34, s12 + 4.0 * s34, d12 + 8.0 * d34 + m5]
}

/// A, the transpose of [`at`]: four output gradients to six transformed ones.
#[inline(always)]
fn a_transposed([y0, y1, y2, y3]: [f32; TILE]) -> [f32; SIDE] {
    let (even, odd) = (y0 + y2, y1 + y3);
    let (even4, odd2) = (y0 + 4.0 * y2, 2.0 * y1 + 8.0 * y3);
    [y0, even + odd, even - odd, even4 + odd2, even4 - odd2, y3]
}

/// Where a transform reads its tiles: a `h`×`w` plane, zero padded by `pad` on the top and left
/// (and as far as the tiles reach on the bottom and right), in `tiles_x` tiles per tile row.
#[derive(Clone, Copy)]
struct Tiling {
    h: usize,
    w: usize,
    pad: usize,
    tiles_x: usize,
}

impl Tiling {
    /// The input planes, which tiles read 6×6 (overlapping by 2).
    fn input(plan: &Plan) -> Self {
        Self { h: plan.in_h, w: plan.in_w, pad: plan.pad, tiles_x: plan.tiles_x }
    }

    /// The output (gradient) planes, which tiles read 4×4.
    fn output(plan: &Plan) -> Self {
        Self { h: plan.out_h, w: plan.out_w, pad: 0, tiles_x: plan.tiles_x }
    }
}

/// [`transform_tiles`] of every plane of `planes` (one sample's channels) into its chunk of
/// `out` ([channel][point][tile]), in parallel over channels.
fn transform_planes<const N: usize, T: Fn([f32; N]) -> [f32; SIDE] + Copy + Sync>(
    planes: &[f32],
    tiling: Tiling,
    rows: Range<usize>,
    out: &mut [f32],
    transform: T,
) {
    let tiles = rows.len() * tiling.tiles_x;
    out.par_chunks_mut(POINTS * tiles)
        .zip(planes.par_chunks_exact(tiling.h * tiling.w))
        .for_each_init(Vec::new, |scratch, (out, plane)| {
            transform_tiles(plane, tiling, rows.clone(), out, scratch, transform)
        });
}

/// T d Tᵀ for every N×N tile of tile rows `rows` of one plane, where `transform` applies T (6×N)
/// to N samples, written to out[point][tile]: Bᵀ d B of the input tiles (N = 6), or A dY Aᵀ of
/// the output gradient tiles (N = 4). Each tile row is first copied with its zero border into N
/// padded lines, so the column transform runs over whole lines.
fn transform_tiles<const N: usize, T: Fn([f32; N]) -> [f32; SIDE]>(
    plane: &[f32],
    tiling: Tiling,
    rows: Range<usize>,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
    transform: T,
) {
    let Tiling { h, w, pad, tiles_x } = tiling;
    let tiles = rows.len() * tiles_x;
    let width = TILE * tiles_x + N - TILE;
    scratch.resize((N + SIDE) * width, 0.0);
    let (padded, columns) = scratch.split_at_mut(N * width);
    for (r, ty) in rows.enumerate() {
        for (k, line) in padded.chunks_exact_mut(width).enumerate() {
            line.fill(0.0);
            let Some(iy) = (TILE * ty + k).checked_sub(pad).filter(|&iy| iy < h) else {
                continue;
            };
            let end = (pad + w).min(width);
            line[pad..end].copy_from_slice(&plane[iy * w..][..end - pad]);
        }
        // Columns: columns[i][x] = Σ_k T[i][k] padded[k][x].
        let l: [&[f32]; N] = std::array::from_fn(|k| &padded[k * width..][..width]);
        let [c0, c1, c2, c3, c4, c5] = lines::<SIDE>(columns, width, 0, 1);
        let (c0, c1, c2) = (&mut c0[..width], &mut c1[..width], &mut c2[..width]);
        let (c3, c4, c5) = (&mut c3[..width], &mut c4[..width], &mut c5[..width]);
        for x in 0..width {
            // (A plain loop: `array::map` here is left as a call per sample.)
            let mut samples = [0f32; N];
            for (sample, line) in samples.iter_mut().zip(&l) {
                *sample = line[x];
            }
            [c0[x], c1[x], c2[x], c3[x], c4[x], c5[x]] = transform(samples);
        }
        // Rows: out[i][j] = Σ_k columns[i][k] T[j][k], tile by tile.
        let first_tile = r * tiles_x;
        for i in 0..SIDE {
            let line = &columns[i * width..][..width];
            for tx in 0..tiles_x {
                let d = line[TILE * tx..][..N].try_into().expect("N samples");
                for (j, value) in transform(d).into_iter().enumerate() {
                    out[(i * SIDE + j) * tiles + first_tile + tx] = value;
                }
            }
        }
    }
}

/// Y = Aᵀ M A for every tile of tile rows `rows`, for output channel `o`, into its plane
/// (positions past the plane's edge are dropped).
fn output_transform(
    m: &[f32],
    o: usize,
    plan: &Plan,
    rows: Range<usize>,
    plane: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let tiles = rows.len() * plan.tiles_x;
    let (tx_n, cout) = (plan.tiles_x, plan.out_channels);
    // point p of tile t lives at m[(p * cout + o) * tiles + t]
    let point = |p: usize| &m[(p * cout + o) * tiles..][..tiles];
    scratch.resize(TILE * SIDE * tx_n, 0.0);
    for (r, ty) in rows.enumerate() {
        let first_tile = r * tx_n;
        // Columns: half[i][j][tx] = Σ_k Aᵀ[i][k] M[k][j] for the tiles of this row.
        for j in 0..SIDE {
            let src: [&[f32]; SIDE] = std::array::from_fn(|k| &point(k * SIDE + j)[first_tile..][..tx_n]);
            for tx in 0..tx_n {
                let out = at([src[0][tx], src[1][tx], src[2][tx], src[3][tx], src[4][tx], src[5][tx]]);
                for (i, value) in out.into_iter().enumerate() {
                    scratch[(i * SIDE + j) * tx_n + tx] = value;
                }
            }
        }
        // Rows: Y[i][s] = Σ_j half[i][j] A[j][s].
        for i in 0..TILE {
            let oy = TILE * ty + i;
            if oy >= plan.out_h {
                break;
            }
            let line = &mut plane[oy * plan.out_w..][..plan.out_w];
            let half: [&[f32]; SIDE] = std::array::from_fn(|j| &scratch[(i * SIDE + j) * tx_n..][..tx_n]);
            // One chunk per tile column; the last is cut at the plane's edge.
            for (tx, dst) in line.chunks_mut(TILE).enumerate() {
                let out = at([half[0][tx], half[1][tx], half[2][tx], half[3][tx], half[4][tx], half[5][tx]]);
                dst.copy_from_slice(&out[..dst.len()]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::conv::{conv3x3_f32, Conv3x3Kernel, Conv3x3Product};

    /// Relative L2 error the F(4×4, 3×3) transforms add in f32 (their ±8 and 1/24 factors cost a
    /// few bits over direct summation; measured errors sit around 1e-6).
    const TOLERANCE: f64 = 1e-5;

    /// Deterministic values in [-1, 1), so failures reproduce.
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    fn relative_l2(ours: &[f32], reference: &[f32]) -> f64 {
        assert_eq!(ours.len(), reference.len(), "result lengths");
        let (mut diff, mut norm) = (0f64, 0f64);
        for (&a, &b) in ours.iter().zip(reference) {
            diff += (a as f64 - b as f64).powi(2);
            norm += (b as f64).powi(2);
        }
        (diff / norm).sqrt()
    }

    /// The three Winograd products against im2col + GEMM on awkward shapes: sides that are not
    /// multiples of 4, planes smaller than one tile, channel counts not multiples of 8, batches
    /// of one to three, padding 0 and 1.
    #[test]
    fn products_match_im2col() {
        for (i, &(batch, cin, cout, h, w, pad)) in [
            (2, 3, 5, 9, 7, 1),
            (2, 17, 6, 3, 5, 0),
            (1, 5, 33, 3, 5, 1),
            (2, 20, 12, 11, 13, 0),
            (3, 12, 20, 13, 10, 1),
            (1, 48, 40, 18, 19, 1),
            (3, 7, 9, 6, 6, 0),
            (2, 37, 19, 21, 15, 0),
            (1, 4, 3, 1, 1, 1),
        ]
        .iter()
        .enumerate()
        {
            let (out_h, out_w) = (h + 2 * pad - 2, w + 2 * pad - 2);
            let weight = values(cout * cin * 9, 3 * i as u64);
            let x = values(batch * cin * h * w, 3 * i as u64 + 1);
            let dy = values(batch * cout * out_h * out_w, 3 * i as u64 + 2);
            for (product, a, b) in [
                (Conv3x3Product::Forward, &x, &weight),
                (Conv3x3Product::InputGrad, &dy, &weight),
                (Conv3x3Product::WeightGrad, &x, &dy),
            ] {
                let run =
                    |kernel| conv3x3_f32(kernel, product, a, b, batch, (cin, cout), (h, w), pad).unwrap();
                let (ours, reference) = (run(Conv3x3Kernel::Winograd), run(Conv3x3Kernel::Im2colGemm));
                let error = relative_l2(&ours, &reference);
                let case = (batch, cin, cout, h, w, pad, product);
                assert!(error < TOLERANCE, "{case:?}: relative L2 error {error:e}");
            }
        }
    }

    /// The weight transform against G g Gᵀ computed with the inference executor's G, for both
    /// orientations.
    #[test]
    fn weight_transform_is_g_kernel_g_transposed() {
        use crate::model::fast::winograd::G;
        let (cout, cin) = (3, 2);
        let w = values(cout * cin * 9, 7);
        for orientation in [Orientation::Forward, Orientation::InputGrad] {
            let t = transform_weights(&w, cout, cin, orientation);
            for a in 0..t.outs {
                for b in 0..t.ins {
                    let kernel = |r: usize, s: usize| match orientation {
                        Orientation::Forward => w[(a * cin + b) * 9 + r * 3 + s],
                        Orientation::InputGrad => w[(b * cin + a) * 9 + (2 - r) * 3 + (2 - s)],
                    };
                    for (i, j) in (0..SIDE).flat_map(|i| (0..SIDE).map(move |j| (i, j))) {
                        let expected: f64 = (0..3)
                            .flat_map(|r| (0..3).map(move |s| (r, s)))
                            .map(|(r, s)| G[i][r] * kernel(r, s) as f64 * G[j][s])
                            .sum();
                        let got = t.u[(a * POINTS + i * SIDE + j) * t.ins + b] as f64;
                        assert!((got - expected).abs() < 1e-6, "U[{a}][{i},{j}][{b}]: {got} vs {expected}");
                    }
                }
            }
        }
    }

    /// The weight gradient's final transform is the transpose of the forward weight transform:
    /// ⟨U(w), dU⟩ = ⟨w, Uᵀ(dU)⟩ for any w and dU (U's layout is [out][point][in], dU's
    /// [point][out][in]).
    #[test]
    fn weight_untransform_is_the_transpose_of_the_transform() {
        let (cout, cin) = (5, 7);
        let w = values(cout * cin * 9, 21);
        let du = values(POINTS * cout * cin, 22);
        let u = transform_weights(&w, cout, cin, Orientation::Forward).u;
        let dw = untransform_weights(&du, cout, cin);
        let mut transformed_side = 0f64;
        for (o, p, i) in
            (0..cout).flat_map(|o| (0..POINTS).flat_map(move |p| (0..cin).map(move |i| (o, p, i))))
        {
            transformed_side += u[(o * POINTS + p) * cin + i] as f64 * du[(p * cout + o) * cin + i] as f64;
        }
        let kernel_side: f64 = w.iter().zip(&dw).map(|(&a, &b)| a as f64 * b as f64).sum();
        let scale: f64 = w.iter().zip(&dw).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
        let error = (transformed_side - kernel_side).abs() / scale;
        assert!(error < 1e-6, "⟨U(w), dU⟩ = {transformed_side}, ⟨w, Uᵀ(dU)⟩ = {kernel_side}");
    }

    /// The bit-exact resume of `cycletrain` needs results that do not depend on the thread count,
    /// including the weight gradient's sums over several blocks of tile rows and samples.
    #[test]
    fn results_are_bit_identical_across_thread_counts() {
        let (batch, cin, cout, h, w, pad) = (2, 40, 36, 150, 122, 1);
        assert!(Plan::new(batch, (cin, cout), (h, w), pad).blocks().count() > 1, "one block only");
        let weight = values(cout * cin * 9, 11);
        let x = values(batch * cin * h * w, 12);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let y = forward(&x, &weight, batch, (cin, cout), (h, w), pad);
                let dx = input_grad(&y, &weight, batch, (cin, cout), (h, w), pad);
                let dw = weight_grad(&x, &y, batch, (cin, cout), (h, w), pad);
                (y, dx, dw)
            })
        };
        let one = run(1);
        for threads in [2, 3, 5] {
            assert!(run(threads) == one, "{threads} threads differ from one");
        }
    }

    #[test]
    fn worthwhile_only_for_wide_layers_on_real_planes() {
        assert!(worthwhile(256, 256, (32, 32)));
        assert!(!worthwhile(3, 256, (32, 32)));
        assert!(!worthwhile(256, 256, (3, 5)));
        assert!(!worthwhile(64, 64, (16, 16)));
    }
}
