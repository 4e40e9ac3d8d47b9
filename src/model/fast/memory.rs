//! The executors' memory plans: the peak bytes one forward pass holds at once, computed from the
//! same buffer sequence that [`super::FastGenerator::forward`] (f32) and
//! [`super::AmxGenerator::forward`] (bf16) allocate.
//!
//! The server budgets memory with it, so it must be an honest upper bound of what the pass
//! really touches: every activation, padded copy and per-thread scratch buffer, plus the input
//! tensor the caller hands in. Weights are not counted (they are resident from load time).

use super::amx_conv::AmxConv;
use super::gemm_conv::GemmConv;
use super::nhwc::Bf16Nhwc;
use super::winograd::WinogradConv;
use crate::model::amx::Block;
use crate::model::config::{Family, GeneratorConfig};

const F32: usize = std::mem::size_of::<f32>();
const BF16: usize = std::mem::size_of::<u16>();

/// Live and peak bytes while the plan is walked.
#[derive(Default)]
struct Ledger {
    live: u64,
    peak: u64,
}

impl Ledger {
    fn alloc(&mut self, bytes: usize) {
        self.live += bytes as u64;
        self.peak = self.peak.max(self.live);
    }

    fn free(&mut self, bytes: usize) {
        self.live -= bytes as u64;
    }

    /// A buffer that exists only during a call (per-thread scratch): raises the peak, then goes.
    fn transient(&mut self, bytes: usize) {
        self.alloc(bytes);
        self.free(bytes);
    }
}

/// Bytes of an N×H×W×C f32 activation.
fn act(n: usize, h: usize, w: usize, c: usize) -> usize {
    n * h * w * c * F32
}

/// Bytes of an N×H×W×C bf16 convolution input as the convolution stores it (channels padded),
/// its slack included.
fn bf16_act(n: usize, h: usize, w: usize, c: usize) -> usize {
    Bf16Nhwc::values(n, h, w, AmxConv::stored_channels(c)) * BF16
}

/// Peak bytes of one forward pass of a generator with `config` on an `n`×3×`h`×`w` input (a
/// padded size: multiples of 4, at least 8), with `threads` worker threads each holding its own
/// convolution scratch. Includes the input tensor and the output tensor.
pub fn forward_peak_bytes(config: &GeneratorConfig, n: usize, h: usize, w: usize, threads: usize) -> u64 {
    let ngf = config.ngf;
    let mut ledger = Ledger::default();
    let gemm_scratch = |taps: usize, cin: usize| threads * GemmConv::scratch_floats(taps, cin) * F32;
    let winograd_scratch = |cin: usize, cout: usize, oh: usize, ow: usize| {
        threads * WinogradConv::scratch_floats(cin, cout, oh, ow) * F32
    };

    // Stem: 7×7 convolution.
    let padded = reflect_padded_input(&mut ledger, n, h, w);
    let mut current = act(n, h, w, ngf);
    ledger.alloc(current);
    ledger.transient(gemm_scratch(49, 3));
    ledger.free(padded);

    // Two stride-2 convolutions, each over a zero-padded copy.
    let (mut ch, mut cw, mut cc) = (h, w, ngf);
    for _ in 0..2 {
        let padded = act(n, ch + 2, cw + 2, cc);
        ledger.alloc(padded);
        let (oh, ow, oc) = ((ch + 2 - 3) / 2 + 1, (cw + 2 - 3) / 2 + 1, 2 * cc);
        let out = act(n, oh, ow, oc);
        ledger.alloc(out);
        ledger.transient(gemm_scratch(9, cc));
        ledger.free(current);
        ledger.free(padded);
        (current, ch, cw, cc) = (out, oh, ow, oc);
    }

    // Residual blocks: input, its padded copy, the first conv's output, its padded copy, the second.
    for _ in 0..config.n_blocks {
        let padded = act(n, ch + 2, cw + 2, cc);
        ledger.alloc(padded);
        ledger.alloc(current);
        ledger.transient(winograd_scratch(cc, cc, ch, cw));
        ledger.free(padded);
        ledger.alloc(padded);
        ledger.alloc(current);
        ledger.transient(winograd_scratch(cc, cc, ch, cw));
        ledger.free(padded);
        ledger.free(current);
        // The block's output replaces its input.
        ledger.free(current);
    }

    // Two upsampling stages, each doubling the size and halving the channels.
    for _ in 0..2 {
        let (oh, ow, oc) = (2 * ch, 2 * cw, cc / 2);
        let out = act(n, oh, ow, oc);
        match config.family {
            Family::Upsample => {
                let upsampled = act(n, oh + 2, ow + 2, cc);
                ledger.alloc(upsampled);
                ledger.alloc(out);
                ledger.transient(winograd_scratch(cc, oc, oh, ow));
                ledger.free(upsampled);
            }
            Family::Transpose => {
                let padded = act(n, ch + 1, cw + 1, cc);
                ledger.alloc(padded);
                ledger.alloc(out);
                // The four phases run one after another; the largest has four taps.
                let phase = act(n, ch, cw, oc);
                ledger.alloc(phase);
                ledger.transient(gemm_scratch(4, cc));
                ledger.free(phase);
                ledger.free(padded);
            }
        }
        ledger.free(current);
        (current, ch, cw, cc) = (out, oh, ow, oc);
    }

    // Head: reflection pad 3, 7×7 convolution to 3 channels, then the NCHW output tensor.
    let padded = act(n, ch + 6, cw + 6, cc);
    ledger.alloc(padded);
    let out = act(n, ch, cw, 3);
    ledger.alloc(out);
    ledger.transient(gemm_scratch(49, cc));
    ledger.free(padded);
    ledger.free(current);
    ledger.alloc(out);
    ledger.free(out);
    // The caller's input tensor and the output tensor are what is left.
    ledger.peak
}

/// Both executors' start: the caller's tensor, a flat copy of it and the channels-last image,
/// then the stem's reflection padding by 3 (in f32), which leaves the caller's tensor and the
/// padded image. Returns the padded image's size, for the caller to free.
fn reflect_padded_input(ledger: &mut Ledger, n: usize, h: usize, w: usize) -> usize {
    let input = act(n, h, w, 3);
    ledger.alloc(input);
    ledger.alloc(input);
    ledger.alloc(input);
    ledger.free(input);
    let padded = act(n, h + 6, w + 6, 3);
    ledger.alloc(padded);
    ledger.free(input);
    padded
}

/// [`forward_peak_bytes`] for the AMX executor. Each convolution reads a bf16 copy of its input
/// (channels padded to 32s) and writes f32; each norm writes the next convolution's bf16 input
/// while its own f32 activation is still held; the upsampling stages write their phases straight
/// into their output.
pub fn forward_peak_bytes_amx(config: &GeneratorConfig, n: usize, h: usize, w: usize, threads: usize) -> u64 {
    let ngf = config.ngf;
    let mut ledger = Ledger::default();
    let block = threads * std::mem::size_of::<Block>();

    // Stem: the f32 padded image's copy with each pixel's 7 columns side by side.
    let padded = reflect_padded_input(&mut ledger, n, h, w);
    let mut next = bf16_act(n, h + 6, w, 7 * 3);
    ledger.alloc(next);
    ledger.free(padded);

    // Then every convolution: its output beside its input, the input freed, and the norm's bf16
    // copy for the next convolution beside the output.
    let (mut ch, mut cw, mut cc) = (h, w, ngf);
    let conv = |ledger: &mut Ledger, next: &mut usize, out: usize, following: usize| {
        ledger.alloc(out);
        ledger.transient(block);
        ledger.free(*next);
        ledger.alloc(following);
        *next = following;
    };
    let stem_out = act(n, h, w, ngf);
    conv(&mut ledger, &mut next, stem_out, bf16_act(n, h + 2, w + 2, ngf));
    ledger.free(stem_out);
    for i in 0..2 {
        let (oh, ow, oc) = ((ch + 2 - 3) / 2 + 1, (cw + 2 - 3) / 2 + 1, 2 * cc);
        let out = act(n, oh, ow, oc);
        let following =
            if i == 0 { bf16_act(n, oh + 2, ow + 2, oc) } else { residual_input(config, n, oh, ow, oc) };
        conv(&mut ledger, &mut next, out, following);
        // The last one's output is the residual stream, held through the blocks.
        if i == 0 {
            ledger.free(out);
        }
        (ch, cw, cc) = (oh, ow, oc);
    }
    let stream = act(n, ch, cw, cc);
    for block_index in 0..config.n_blocks {
        let t = act(n, ch, cw, cc);
        conv(&mut ledger, &mut next, t, bf16_act(n, ch + 2, cw + 2, cc));
        ledger.free(t);
        let following = if block_index + 1 < config.n_blocks {
            bf16_act(n, ch + 2, cw + 2, cc)
        } else {
            up_input(config, n, ch, cw, cc)
        };
        conv(&mut ledger, &mut next, stream, following);
        // The block's output replaces its input.
        ledger.free(stream);
    }
    ledger.free(stream);
    for stage in 0..2 {
        let (oh, ow, oc) = (2 * ch, 2 * cw, cc / 2);
        let out = act(n, oh, ow, oc);
        let following =
            if stage == 0 { up_input(config, n, oh, ow, oc) } else { bf16_act(n, oh + 6, ow + 6, oc) };
        conv(&mut ledger, &mut next, out, following);
        ledger.free(out);
        (ch, cw, cc) = (oh, ow, oc);
    }

    // Head: 7×7 convolution to 3 channels, tanh in place, then the NCHW output tensor.
    let out = act(n, ch, cw, 3);
    ledger.alloc(out);
    ledger.transient(block);
    ledger.free(next);
    ledger.alloc(out);
    ledger.free(out);
    ledger.peak
}

/// The bf16 input of the first residual block (or of the upsampling when there is none).
fn residual_input(config: &GeneratorConfig, n: usize, h: usize, w: usize, c: usize) -> usize {
    if config.n_blocks > 0 {
        bf16_act(n, h + 2, w + 2, c)
    } else {
        up_input(config, n, h, w, c)
    }
}

/// The bf16 input of an upsampling stage: padded by one zero all round (upsample family) or at
/// the bottom and right (transposed).
fn up_input(config: &GeneratorConfig, n: usize, h: usize, w: usize, c: usize) -> usize {
    match config.family {
        Family::Upsample => bf16_act(n, h + 2, w + 2, c),
        Family::Transpose => bf16_act(n, h + 1, w + 1, c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_is_linear_in_pixels_whatever_the_aspect_ratio() {
        let config = GeneratorConfig { family: Family::Upsample, ngf: 32, n_blocks: 6, norm_affine: false };
        let square = forward_peak_bytes(&config, 1, 256, 256, 2);
        let strip = forward_peak_bytes(&config, 1, 8, 8192, 2);
        let long = forward_peak_bytes(&config, 1, 65536, 8, 2);
        let per_pixel = |bytes: u64, pixels: u64| bytes as f64 / pixels as f64;
        let reference = per_pixel(square, 256 * 256);
        for (bytes, pixels) in [(strip, 8 * 8192), (long, 65536 * 8)] {
            let ratio = per_pixel(bytes, pixels) / reference;
            assert!((0.8..1.6).contains(&ratio), "bytes per pixel {ratio:.2}× the square image's");
        }
        let batch = forward_peak_bytes(&config, 4, 256, 256, 2);
        assert!(batch < 4 * square && batch > 3 * square, "a batch of 4 costs about 4 images");
    }
}
