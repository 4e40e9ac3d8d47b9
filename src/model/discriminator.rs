//! The PatchGAN discriminator of the seed article (PyTorch-GAN's CycleGAN).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::DiscriminatorConfig;
use super::conv::{Conv2d, ConvConfig};
use super::instance_norm::{Activation, InstanceNorm};

const LEAKY_SLOPE: f64 = 0.2;
const LEAKY: Activation = Activation::LeakyRelu(LEAKY_SLOPE);
/// The four halving convolutions.
const DOWN: ConvConfig = ConvConfig { kernel: 4, stride: 2, padding: 1 };
/// The scoring convolution; its asymmetric zero padding is applied before it.
const HEAD: ConvConfig = ConvConfig { kernel: 4, stride: 1, padding: 0 };

/// Scores each 70×70-ish patch of an NCHW batch; the output is N×1×(H/16)×(W/16).
#[derive(Clone, Debug)]
pub struct Discriminator {
    /// Four k4 s2 p1 convolutions; every one but the first is followed by instance norm.
    convs: Vec<(Conv2d, Option<InstanceNorm>)>,
    head: Conv2d,
}

impl Discriminator {
    pub fn new(config: DiscriminatorConfig, vb: VarBuilder) -> Result<Self> {
        let n = config.ndf;
        let widths = [(3, n), (n, 2 * n), (2 * n, 4 * n), (4 * n, 8 * n)];
        let convs = widths
            .iter()
            .enumerate()
            .map(|(layer, &(cin, cout))| {
                let conv = Conv2d::new(cin, cout, DOWN, vb.pp(DiscriminatorConfig::conv_key(layer)))?;
                let norm = (layer > 0).then(|| InstanceNorm::new(cout, false, vb.clone())).transpose()?;
                Ok((conv, norm))
            })
            .collect::<Result<Vec<_>>>()?;
        // ZeroPad2d((1, 0, 1, 0)) then a padding-1 conv: zero padding is applied explicitly.
        let head = Conv2d::new(8 * n, 1, HEAD, vb.pp(DiscriminatorConfig::conv_key(4)))?;
        Ok(Self { convs, head })
    }
}

impl Module for Discriminator {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for (conv, norm) in &self.convs {
            h = conv.forward(&h)?;
            h = match norm {
                Some(norm) => norm.forward_then(&h, LEAKY)?,
                None => candle_nn::ops::leaky_relu(&h, LEAKY_SLOPE)?,
            };
        }
        // Left/top: 1 from ZeroPad2d + 1 from the conv; right/bottom: 1 from the conv.
        let h = h.pad_with_zeros(3, 2, 1)?.pad_with_zeros(2, 2, 1)?;
        self.head.forward(&h)
    }
}
