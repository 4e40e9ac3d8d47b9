//! The CycleGAN ResNet generator, in both published families.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::{Family, GeneratorConfig, GeneratorLayer};
use super::conv::{Conv2d, ConvConfig, ConvTranspose2d};
use super::instance_norm::{Activation, InstanceNorm};
use super::layers::{reflection_pad, upsample_nearest2x};

/// Conv, instance norm, ReLU: the downsampling stages.
#[derive(Clone, Debug)]
struct ConvNormRelu {
    conv: Conv2d,
    norm: InstanceNorm,
}

impl Module for ConvNormRelu {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.norm.forward_then(&self.conv.forward(x)?, Activation::Relu)
    }
}

/// `x + [RPad1, Conv3, IN, ReLU, RPad1, Conv3, IN](x)`.
#[derive(Clone, Debug)]
struct ResidualBlock {
    conv1: Conv2d,
    norm1: InstanceNorm,
    conv2: Conv2d,
    norm2: InstanceNorm,
}

impl ResidualBlock {
    fn new(config: &GeneratorConfig, block: usize, vb: &VarBuilder) -> Result<Self> {
        let layer = |conv| GeneratorLayer::Block { block, conv };
        Ok(Self {
            conv1: conv_at(config, layer(0), 1, 0, vb)?,
            norm1: norm_at(config, layer(0), vb)?,
            conv2: conv_at(config, layer(1), 1, 0, vb)?,
            norm2: norm_at(config, layer(1), vb)?,
        })
    }
}

/// A layer's convolution, at the key config.rs names for it.
fn conv_at(
    config: &GeneratorConfig,
    layer: GeneratorLayer,
    stride: usize,
    padding: usize,
    vb: &VarBuilder,
) -> Result<Conv2d> {
    let (cin, cout) = config.channels(layer);
    let kernel = config.weight_shape(layer)[3];
    Conv2d::new(cin, cout, ConvConfig { kernel, stride, padding }, vb.pp(config.conv_key(layer)))
}

/// The instance norm after a layer's convolution (every layer but the head has one).
fn norm_at(config: &GeneratorConfig, layer: GeneratorLayer, vb: &VarBuilder) -> Result<InstanceNorm> {
    let Some(key) = config.norm_key(layer) else { candle_core::bail!("{layer:?} has no norm") };
    InstanceNorm::new(config.channels(layer).1, config.norm_affine, vb.pp(key))
}

impl Module for ResidualBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&reflection_pad(x, 1)?)?;
        let h = self.norm1.forward_then(&h, Activation::Relu)?;
        let h = self.conv2.forward(&reflection_pad(&h, 1)?)?;
        x + self.norm2.forward(&h)?
    }
}

/// One ×2 upsampling stage followed by instance norm and ReLU.
#[derive(Clone, Debug)]
enum UpStage {
    NearestConv { conv: Conv2d, norm: InstanceNorm },
    Transposed { conv: ConvTranspose2d, norm: InstanceNorm },
}

impl UpStage {
    fn new(config: &GeneratorConfig, stage: usize, vb: &VarBuilder) -> Result<Self> {
        let layer = GeneratorLayer::Up(stage);
        let norm = norm_at(config, layer, vb)?;
        Ok(match config.family {
            Family::Upsample => Self::NearestConv { conv: conv_at(config, layer, 1, 1, vb)?, norm },
            Family::Transpose => {
                let (cin, cout) = config.channels(layer);
                let conv = ConvTranspose2d::new(cin, cout, vb.pp(config.conv_key(layer)))?;
                Self::Transposed { conv, norm }
            }
        })
    }
}

impl Module for UpStage {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (h, norm) = match self {
            Self::NearestConv { conv, norm } => (conv.forward(&upsample_nearest2x(x)?)?, norm),
            Self::Transposed { conv, norm } => (conv.forward(x)?, norm),
        };
        norm.forward_then(&h, Activation::Relu)
    }
}

/// Maps an NCHW image batch in [-1, 1] to the other domain, also in [-1, 1].
#[derive(Clone, Debug)]
pub struct Generator {
    stem: Conv2d,
    stem_norm: InstanceNorm,
    down: [ConvNormRelu; 2],
    blocks: Vec<ResidualBlock>,
    up: [UpStage; 2],
    head: Conv2d,
}

impl Generator {
    /// `vb` must be positioned at the network (e.g. `vb.pp("G")`); keys below it are PyTorch's.
    pub fn new(config: GeneratorConfig, vb: VarBuilder) -> Result<Self> {
        let down = |i: usize| -> Result<ConvNormRelu> {
            let layer = GeneratorLayer::Down(i);
            Ok(ConvNormRelu {
                conv: conv_at(&config, layer, 2, 1, &vb)?,
                norm: norm_at(&config, layer, &vb)?,
            })
        };
        Ok(Self {
            stem: conv_at(&config, GeneratorLayer::Stem, 1, 0, &vb)?,
            stem_norm: norm_at(&config, GeneratorLayer::Stem, &vb)?,
            down: [down(0)?, down(1)?],
            blocks: (0..config.n_blocks)
                .map(|block| ResidualBlock::new(&config, block, &vb))
                .collect::<Result<Vec<_>>>()?,
            up: [UpStage::new(&config, 0, &vb)?, UpStage::new(&config, 1, &vb)?],
            head: conv_at(&config, GeneratorLayer::Head, 1, 0, &vb)?,
        })
    }
}

impl Module for Generator {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.stem.forward(&reflection_pad(x, 3)?)?;
        h = self.stem_norm.forward_then(&h, Activation::Relu)?;
        for layer in &self.down {
            h = layer.forward(&h)?;
        }
        for block in &self.blocks {
            h = block.forward(&h)?;
        }
        for stage in &self.up {
            h = stage.forward(&h)?;
        }
        self.head.forward(&reflection_pad(&h, 3)?)?.tanh()
    }
}
