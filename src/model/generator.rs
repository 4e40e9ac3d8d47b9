//! The CycleGAN ResNet generator, in both published families.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::{Family, GeneratorConfig};
use super::conv::{Conv2d, ConvConfig, ConvTranspose2d};
use super::layers::{reflection_pad, upsample_nearest2x, InstanceNorm};

/// The 7×7 stem and head; reflection padding comes before them.
const WIDE: ConvConfig = ConvConfig { kernel: 7, stride: 1, padding: 0 };
/// The two halving stages.
const DOWN: ConvConfig = ConvConfig { kernel: 3, stride: 2, padding: 1 };
/// Residual-block convolutions; reflection padding comes before them.
const BLOCK: ConvConfig = ConvConfig { kernel: 3, stride: 1, padding: 0 };
/// The convolution after each nearest ×2 upsampling.
const AFTER_UPSAMPLE: ConvConfig = ConvConfig { kernel: 3, stride: 1, padding: 1 };

/// Conv, instance norm, ReLU: the downsampling stages.
#[derive(Clone, Debug)]
struct ConvNormRelu {
    conv: Conv2d,
    norm: InstanceNorm,
}

impl Module for ConvNormRelu {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.norm.forward(&self.conv.forward(x)?)?.relu()
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
    fn new(channels: usize, affine: bool, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv1: Conv2d::new(channels, channels, BLOCK, vb.pp("1"))?,
            norm1: InstanceNorm::new(channels, affine, vb.pp("2"))?,
            conv2: Conv2d::new(channels, channels, BLOCK, vb.pp("5"))?,
            norm2: InstanceNorm::new(channels, affine, vb.pp("6"))?,
        })
    }
}

impl Module for ResidualBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&reflection_pad(x, 1)?)?;
        let h = self.norm1.forward(&h)?.relu()?;
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
    fn new(
        family: Family,
        cin: usize,
        cout: usize,
        affine: bool,
        vb: &VarBuilder,
        index: usize,
    ) -> Result<Self> {
        Ok(match family {
            Family::Upsample => Self::NearestConv {
                conv: Conv2d::new(cin, cout, AFTER_UPSAMPLE, vb.pp(index.to_string()))?,
                norm: InstanceNorm::new(cout, affine, vb.pp((index + 1).to_string()))?,
            },
            Family::Transpose => Self::Transposed {
                conv: ConvTranspose2d::new(cin, cout, vb.pp(index.to_string()))?,
                norm: InstanceNorm::new(cout, affine, vb.pp((index + 1).to_string()))?,
            },
        })
    }
}

impl Module for UpStage {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (h, norm) = match self {
            Self::NearestConv { conv, norm } => (conv.forward(&upsample_nearest2x(x)?)?, norm),
            Self::Transposed { conv, norm } => (conv.forward(x)?, norm),
        };
        norm.forward(&h)?.relu()
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
        let GeneratorConfig { family, ngf, n_blocks, norm_affine: affine } = config;
        let vb = vb.pp("model");
        let idx = config.indices();
        let at = |i: usize| vb.pp(i.to_string());
        let down = |i: usize, cin: usize, cout: usize| -> Result<ConvNormRelu> {
            Ok(ConvNormRelu {
                conv: Conv2d::new(cin, cout, DOWN, at(i))?,
                norm: InstanceNorm::new(cout, affine, at(i + 1))?,
            })
        };
        let blocks = (0..n_blocks)
            .map(|b| ResidualBlock::new(4 * ngf, affine, at(idx.first_block + b).pp(family.block_name())))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            stem: Conv2d::new(3, ngf, WIDE, at(idx.stem))?,
            stem_norm: InstanceNorm::new(ngf, affine, at(idx.stem + 1))?,
            down: [down(idx.down[0], ngf, 2 * ngf)?, down(idx.down[1], 2 * ngf, 4 * ngf)?],
            blocks,
            up: [
                UpStage::new(family, 4 * ngf, 2 * ngf, affine, &vb, idx.up[0])?,
                UpStage::new(family, 2 * ngf, ngf, affine, &vb, idx.up[1])?,
            ],
            head: Conv2d::new(ngf, 3, WIDE, at(idx.head))?,
        })
    }
}

impl Module for Generator {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.stem.forward(&reflection_pad(x, 3)?)?;
        h = self.stem_norm.forward(&h)?.relu()?;
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
