//! Convolutions as GEMMs over channels-last patches: the 7×7 and strided layers, and the four
//! sub-pixel phases a stride-2 transposed convolution splits into.

use rayon::prelude::*;

use super::nhwc::Nhwc;
use crate::model::gemm::{matmul, Mat, MatMut, Threads};

/// Aim for patch blocks of about this many elements (4 MiB of f32) per GEMM.
const BLOCK_ELEMENTS: usize = 1 << 20;

/// A convolution given by its taps: output (oy, ox) sums input (stride·oy + dy, stride·ox + dx)
/// times the tap's [cin, cout] weights, over all taps. The input comes padded.
#[derive(Clone, Debug)]
pub struct GemmConv {
    taps: Vec<(usize, usize)>,
    stride: usize,
    cin: usize,
    cout: usize,
    /// [taps·cin, cout], rows in tap order.
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl GemmConv {
    /// From PyTorch's [cout, cin, k, k] convolution weight.
    pub fn conv(weight: &[f32], bias: &[f32], cout: usize, cin: usize, k: usize, stride: usize) -> Self {
        let taps: Vec<(usize, usize)> = (0..k).flat_map(|y| (0..k).map(move |x| (y, x))).collect();
        let mut packed = vec![0f32; taps.len() * cin * cout];
        for o in 0..cout {
            for i in 0..cin {
                for (t, (y, x)) in taps.iter().enumerate() {
                    packed[(t * cin + i) * cout + o] = weight[((o * cin + i) * k + y) * k + x];
                }
            }
        }
        Self { taps, stride, cin, cout, weight: packed, bias: bias.to_vec() }
    }

    /// The four phases of ConvTranspose2d(k3, s2, p1, output_padding 1) from PyTorch's
    /// [cin, cout, 3, 3] weight, as (row parity, column parity, convolution). Output row 2m
    /// takes kernel row 1 at input row m; row 2m+1 takes kernel row 2 at m and row 0 at m+1.
    pub fn transposed_phases(
        weight: &[f32],
        bias: &[f32],
        cin: usize,
        cout: usize,
    ) -> Vec<(usize, usize, Self)> {
        let per_parity: [&[(usize, usize)]; 2] = [&[(1, 0)], &[(2, 0), (0, 1)]];
        let mut phases = Vec::new();
        for (a, rows) in per_parity.iter().enumerate() {
            for (b, cols) in per_parity.iter().enumerate() {
                let kernel_taps: Vec<((usize, usize), (usize, usize))> = rows
                    .iter()
                    .flat_map(|&(ky, dy)| cols.iter().map(move |&(kx, dx)| ((ky, kx), (dy, dx))))
                    .collect();
                let mut packed = vec![0f32; kernel_taps.len() * cin * cout];
                for (t, ((ky, kx), _)) in kernel_taps.iter().enumerate() {
                    for i in 0..cin {
                        for o in 0..cout {
                            packed[(t * cin + i) * cout + o] = weight[((i * cout + o) * 3 + ky) * 3 + kx];
                        }
                    }
                }
                let taps = kernel_taps.iter().map(|(_, offset)| *offset).collect();
                phases.push((a, b, Self { taps, stride: 1, cin, cout, weight: packed, bias: bias.to_vec() }));
            }
        }
        phases
    }

    /// Nearest ×2 upsampling followed by a 3×3 convolution with zero padding 1, from PyTorch's
    /// [cout, cin, 3, 3] weight, as four 2×2 convolutions of the input padded by one zero pixel
    /// all round, one per output phase (row parity, column parity, convolution). Output row 2m
    /// reads upsampled rows 2m−1, 2m and 2m+1, that is input rows m−1 (kernel row 0) and m (rows
    /// 1 and 2); row 2m+1 reads input rows m (kernel rows 0 and 1) and m+1 (row 2). Columns
    /// likewise. 4 taps instead of 9 per output pixel.
    pub fn upsample_phases(
        weight: &[f32],
        bias: &[f32],
        cin: usize,
        cout: usize,
    ) -> Vec<(usize, usize, Self)> {
        // Per parity: (offset in the padded input, the kernel rows that land there).
        type Landing = (usize, &'static [usize]);
        let per_parity: [[Landing; 2]; 2] = [[(0, &[0]), (1, &[1, 2])], [(1, &[0, 1]), (2, &[2])]];
        let mut phases = Vec::new();
        for (a, rows) in per_parity.iter().enumerate() {
            for (b, cols) in per_parity.iter().enumerate() {
                let mut taps = Vec::new();
                let mut packed = vec![0f32; 4 * cin * cout];
                for &(dy, kys) in rows {
                    for &(dx, kxs) in cols {
                        let t = taps.len();
                        taps.push((dy, dx));
                        for i in 0..cin {
                            for o in 0..cout {
                                let kernel = |(ky, kx): (usize, usize)| {
                                    weight[((o * cin + i) * 3 + ky) * 3 + kx] as f64
                                };
                                let landing = kys.iter().flat_map(|&ky| kxs.iter().map(move |&kx| (ky, kx)));
                                packed[(t * cin + i) * cout + o] = landing.map(kernel).sum::<f64>() as f32;
                            }
                        }
                    }
                }
                phases.push((a, b, Self { taps, stride: 1, cin, cout, weight: packed, bias: bias.to_vec() }));
            }
        }
        phases
    }

    /// The same stride-1 convolution over an input whose pixels carry their `k` right-hand
    /// neighbours' channels too (see [`super::nhwc::fold_columns_bf16`]): one tap per kernel
    /// row, `k·cin` channels. For a layer with few channels (the 3-channel stem) that makes a
    /// depth worth a tile's without padding every pixel's channels.
    pub fn folded_columns(&self) -> Self {
        assert_eq!(self.stride, 1, "folding columns needs stride 1");
        let k = self.taps.iter().map(|t| t.1).max().map_or(1, |dx| dx + 1);
        assert_eq!(self.taps.len(), k * k, "folding columns needs a whole square kernel");
        let (cin, cout) = (self.cin, self.cout);
        let mut weight = vec![0f32; self.weight.len()];
        for (t, &(dy, dx)) in self.taps.iter().enumerate() {
            for c in 0..cin {
                let folded = (dy * k + dx) * cin + c;
                weight[folded * cout..(folded + 1) * cout]
                    .copy_from_slice(&self.weight[(t * cin + c) * cout..][..cout]);
            }
        }
        let taps = (0..k).map(|dy| (dy, 0)).collect();
        Self { taps, stride: 1, cin: k * cin, cout, weight, bias: self.bias.clone() }
    }

    pub fn cout(&self) -> usize {
        self.cout
    }

    pub fn cin(&self) -> usize {
        self.cin
    }

    pub fn stride(&self) -> usize {
        self.stride
    }

    /// Input offsets (row, column) of the taps, in the order of the weight's rows.
    pub fn taps(&self) -> &[(usize, usize)] {
        &self.taps
    }

    /// [taps·cin, cout], rows in tap order.
    pub fn weight(&self) -> &[f32] {
        &self.weight
    }

    pub fn bias(&self) -> &[f32] {
        &self.bias
    }

    /// Output size for an input of `h`×`w`.
    pub fn output_size(&self, h: usize, w: usize) -> (usize, usize) {
        output_size(&self.taps, self.stride, h, w)
    }

    pub fn forward(&self, x: &Nhwc) -> Nhwc {
        let (out_h, out_w) = self.output_size(x.h, x.w);
        self.forward_sized(x, out_h, out_w)
    }

    /// Patch rows gathered per block: about [`BLOCK_ELEMENTS`] floats whatever the image's
    /// shape, so the scratch does not grow with one side.
    pub fn pixels_per_block(taps: usize, cin: usize) -> usize {
        (BLOCK_ELEMENTS / (taps * cin)).max(1)
    }

    /// Per-thread scratch, in floats, for a convolution of `taps` taps over `cin` channels.
    pub fn scratch_floats(taps: usize, cin: usize) -> usize {
        Self::pixels_per_block(taps, cin) * taps * cin
    }

    /// Computes only the first `out_h`×`out_w` outputs (a phase of a transposed convolution
    /// makes as many outputs as its input has pixels).
    pub fn forward_sized(&self, x: &Nhwc, out_h: usize, out_w: usize) -> Nhwc {
        assert_eq!(x.c, self.cin, "gemm conv: channel count");
        let (max_h, max_w) = self.output_size(x.h, x.w);
        assert!(out_h <= max_h && out_w <= max_w, "gemm conv: output larger than the input allows");
        let mut y = Nhwc::zeros(x.n, out_h, out_w, self.cout);
        let k = self.taps.len() * self.cin;
        let pixels_per_block = Self::pixels_per_block(self.taps.len(), self.cin);
        let out_sample = out_h * out_w * self.cout;
        // Blocks are runs of consecutive output pixels (row-major), so each writes one
        // contiguous slice of the output and needs the same scratch whatever the aspect ratio.
        y.data
            .par_chunks_mut(out_sample)
            .enumerate()
            .flat_map(|(s, sample)| {
                sample
                    .par_chunks_mut(pixels_per_block * self.cout)
                    .enumerate()
                    .map(move |(b, out)| (s, b * pixels_per_block, out))
            })
            .for_each_init(
                || vec![0f32; pixels_per_block * k],
                |patches, (s, first, out)| {
                    let pixels = out.len() / self.cout;
                    let input = &x.data[s * x.sample_len()..][..x.sample_len()];
                    let patches = &mut patches[..pixels * k];
                    self.gather(input, x.w, first, pixels, out_w, patches);
                    for pixel in out.chunks_mut(self.cout) {
                        pixel.copy_from_slice(&self.bias);
                    }
                    let a = Mat::new(patches, pixels, k, k);
                    let w = Mat::new(&self.weight, k, self.cout, self.cout);
                    let out = MatMut::new(out, pixels, self.cout, self.cout);
                    matmul(out, true, a, w, Threads::One);
                },
            );
        y
    }

    /// Patch rows for output pixels `first..first + pixels` (row-major): per output pixel, each
    /// tap's input pixel (all channels) in tap order.
    fn gather(
        &self,
        input: &[f32],
        in_w: usize,
        first: usize,
        pixels: usize,
        out_w: usize,
        patches: &mut [f32],
    ) {
        let c = self.cin;
        let k = self.taps.len() * c;
        for (p, row) in patches.chunks_mut(k).take(pixels).enumerate() {
            let (oy, ox) = ((first + p) / out_w, (first + p) % out_w);
            for (t, &(dy, dx)) in self.taps.iter().enumerate() {
                let (iy, ix) = (self.stride * oy + dy, self.stride * ox + dx);
                row[t * c..(t + 1) * c].copy_from_slice(&input[(iy * in_w + ix) * c..][..c]);
            }
        }
    }
}

/// Output size of a convolution with these (row, column) tap offsets and stride over an `h`×`w`
/// input.
pub fn output_size(taps: &[(usize, usize)], stride: usize, h: usize, w: usize) -> (usize, usize) {
    let dy = taps.iter().map(|t| t.0).max().unwrap_or(0);
    let dx = taps.iter().map(|t| t.1).max().unwrap_or(0);
    ((h - dy - 1) / stride + 1, (w - dx - 1) / stride + 1)
}
