//! The generator on AMX bf16 tiles: [`FastGenerator`](super::FastGenerator)'s layers and
//! order, with every convolution an [`AmxConv`] (bf16 inputs and weights, f32 sums), both
//! upsampling stages as four sub-pixel phases written straight into their output, and the
//! 3-channel stem as a 7×1 convolution over 21 channels (each pixel with its six right-hand
//! neighbours). Instance norm, ReLU, the residual adds and tanh run in f32 as in the f32
//! executor; each norm also writes the next convolution's input, padded and rounded to bf16, in
//! the same pass.

use std::collections::HashMap;

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::amx_conv::{AmxConv, Output};
use super::gemm_conv::GemmConv;
use super::nhwc::{fold_columns_bf16, instance_norm_bf16, pad, After, Bf16Nhwc, Border, Nhwc};
use super::{affine, forward_channels_last, LayerSource, NormParams};
use crate::model::amx::{Amx, ACC_VALUES};
use crate::model::config::{Family, GeneratorConfig, GeneratorLayer};

/// An upsampling stage's four phases: (row parity, column parity, convolution).
type Phases = Vec<(usize, usize, AmxConv)>;

#[derive(Clone, Debug)]
pub struct AmxGenerator {
    amx: Amx,
    family: Family,
    stem: (AmxConv, NormParams),
    down: [(AmxConv, NormParams); 2],
    blocks: Vec<[(AmxConv, NormParams); 2]>,
    /// Each upsampling stage's phases, and its norm.
    up: [(Phases, NormParams); 2],
    head: AmxConv,
}

impl AmxGenerator {
    /// Builds the executor from PyTorch-named weights (as a model file holds them).
    pub fn new(amx: Amx, config: GeneratorConfig, weights: &HashMap<String, Tensor>) -> Result<Self> {
        let source = LayerSource { config, weights };
        let with_norm = |(conv, norm): (GemmConv, NormParams)| (AmxConv::new(&conv), norm);
        let (stem, stem_norm) = source.stem()?;
        let blocks = (0..config.n_blocks)
            .map(|block| -> Result<_> {
                let conv = |i| -> Result<_> {
                    let layer = GeneratorLayer::Block { block, conv: i };
                    Ok((AmxConv::new(&source.conv(layer, 1)?), source.norm(layer)?))
                };
                Ok([conv(0)?, conv(1)?])
            })
            .collect::<Result<Vec<_>>>()?;
        let up = |stage| -> Result<_> {
            let phases =
                source.up_phases(stage)?.iter().map(|(a, b, conv)| (*a, *b, AmxConv::new(conv))).collect();
            Ok((phases, source.norm(GeneratorLayer::Up(stage))?))
        };
        Ok(Self {
            amx,
            family: config.family,
            stem: (AmxConv::new(&stem.folded_columns()), stem_norm),
            down: [with_norm(source.down(0)?), with_norm(source.down(1)?)],
            blocks,
            up: [up(0)?, up(1)?],
            head: AmxConv::new(&source.head()?),
        })
    }

    /// Maps an NCHW f32 batch in [-1, 1] on the CPU to the other domain. The buffers it
    /// allocates, in order, are what [`super::memory::forward_peak_bytes_amx`] accounts for.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        forward_channels_last(x, |image| self.run(image))
    }

    fn run(&self, image: Nhwc) -> Nhwc {
        let amx = self.amx;
        // What the next convolution reads: a norm's output padded as that convolution wants it,
        // in the channels it stores.
        let spec = |conv: &AmxConv, before, after, border| (before, after, border, conv.channels());
        let up_spec = |stage: usize| {
            let conv = &self.up[stage].0[0].2;
            match self.family {
                Family::Upsample => spec(conv, 1, 1, Border::Zero),
                Family::Transpose => spec(conv, 0, 1, Border::Zero),
            }
        };
        let block_spec = |block: usize| match self.blocks.get(block) {
            Some([(conv1, _), _]) => spec(conv1, 1, 1, Border::Reflect),
            None => up_spec(0),
        };
        let norm = |x: &mut Nhwc, params: &NormParams, after: After, next| {
            instance_norm_bf16(x, affine(params), after, next)
        };

        let padded = pad(&image, 3, 3, Border::Reflect);
        drop(image);
        let input = fold_columns_bf16(&padded, 7, self.stem.0.channels());
        drop(padded);
        let mut x = self.stem.0.forward(amx, &input);
        drop(input);
        let input = norm(&mut x, &self.stem.1, After::Relu, spec(&self.down[0].0, 1, 1, Border::Zero));
        drop(x);
        let mut x = self.down[0].0.forward(amx, &input);
        drop(input);
        let input = norm(&mut x, &self.down[0].1, After::Relu, spec(&self.down[1].0, 1, 1, Border::Zero));
        drop(x);
        // The residual stream: `h` in f32, `input` its bf16 copy for whatever follows.
        let mut h = self.down[1].0.forward(amx, &input);
        drop(input);
        let mut input = norm(&mut h, &self.down[1].1, After::Relu, block_spec(0));
        for (block, [(conv1, norm1), (conv2, norm2)]) in self.blocks.iter().enumerate() {
            let mut t = conv1.forward(amx, &input);
            drop(input);
            let t_input = norm(&mut t, norm1, After::Relu, spec(conv2, 1, 1, Border::Reflect));
            drop(t);
            let mut out = conv2.forward(amx, &t_input);
            drop(t_input);
            input = norm(&mut out, norm2, After::Residual(&h), block_spec(block + 1));
            h = out;
        }
        let (mut side_h, mut side_w) = (h.h, h.w);
        drop(h);
        for (stage, (phases, params)) in self.up.iter().enumerate() {
            let mut x = upsample(amx, &input, (side_h, side_w), phases);
            drop(input);
            let next = if stage == 0 { up_spec(1) } else { spec(&self.head, 3, 3, Border::Reflect) };
            input = norm(&mut x, params, After::Relu, next);
            (side_h, side_w) = (x.h, x.w);
        }
        let mut out = self.head.forward(amx, &input);
        drop(input);
        out.data.par_iter_mut().for_each(|v| *v = v.tanh());
        out
    }
}

/// An upsampling stage: its four phases, each writing every other pixel of every other row of
/// the 2h×2w output straight into it, a pair of output rows per task.
fn upsample(amx: Amx, input: &Bf16Nhwc, (h, w): (usize, usize), phases: &[(usize, usize, AmxConv)]) -> Nhwc {
    let cout = phases[0].2.cout();
    let mut out = Nhwc::zeros(input.n, 2 * h, 2 * w, cout);
    let row_len = 2 * w * cout;
    out.data.par_chunks_mut(2 * row_len).enumerate().for_each_init(
        || Box::new([0f32; 4 * ACC_VALUES]),
        |block, (pair, rows)| {
            let (even, odd) = rows.split_at_mut(row_len);
            for (a, b, conv) in phases {
                let row = if *a == 0 { &mut *even } else { &mut *odd };
                let output = Output { row, first: b * cout, pixel_stride: 2 * cout };
                conv.row(amx, input, (pair / h, pair % h), w, output, block);
            }
        },
    );
    out
}
