//! Architecture descriptions, and the PyTorch parameter names and shapes they imply.
//!
//! The key names here (`conv_key`, `norm_key`, `parameters`) are the single source of truth:
//! model files are checked against them, imports are mapped onto them, and both generator
//! executors and the discriminator read their weights through them (a test holds them together).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The two published ways of upsampling back to full resolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// Nearest ×2 upsample + 3×3 conv, residual blocks named `block` (PyTorch-GAN, our seed).
    Upsample,
    /// ConvTranspose2d(k3, s2, p1, op1), residual blocks named `conv_block` (original CycleGAN).
    Transpose,
}

impl Family {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Upsample => "upsample",
            Self::Transpose => "transpose",
        }
    }

    /// The attribute name the residual block's Sequential has in this family's source code.
    pub fn block_name(self) -> &'static str {
        match self {
            Self::Upsample => "block",
            Self::Transpose => "conv_block",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Family {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "upsample" => Ok(Self::Upsample),
            "transpose" => Ok(Self::Transpose),
            _ => Err(format!("unknown family `{s}`: expected `upsample` or `transpose`")),
        }
    }
}

/// One parameter tensor: its PyTorch name (without network prefix) and shape.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl ParamSpec {
    pub fn new(name: impl Into<String>, shape: impl Into<Vec<usize>>) -> Self {
        Self { name: name.into(), shape: shape.into() }
    }
}

/// The CycleGAN ResNet generator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GeneratorConfig {
    pub family: Family,
    /// Filters of the first layer; the bottleneck has 4× as many.
    pub ngf: usize,
    pub n_blocks: usize,
    /// Instance norm with learned scale and shift (`.weight`/`.bias` at its own index).
    pub norm_affine: bool,
}

/// E.g. "upsample family, ngf 64, 9 blocks, non-affine instance norm".
impl fmt::Display for GeneratorConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let norm = if self.norm_affine { "affine" } else { "non-affine" };
        write!(f, "{} family, ngf {}, {} blocks, {norm} instance norm", self.family, self.ngf, self.n_blocks)
    }
}

/// One convolution of the generator (with the instance norm that follows it, if any).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GeneratorLayer {
    /// The 7×7 convolution from RGB.
    Stem,
    /// Stride-2 convolution `0` or `1`.
    Down(usize),
    /// Convolution `conv` (0 or 1) of residual block `block`.
    Block { block: usize, conv: usize },
    /// Upsampling stage `0` or `1`: a 3×3 conv after a nearest ×2, or a transposed conv.
    Up(usize),
    /// The 7×7 convolution to RGB (no norm; tanh follows).
    Head,
}

/// Positions in the residual block's Sequential: RPad, Conv, IN, ReLU, RPad, Conv, IN.
const BLOCK_CONVS: [usize; 2] = [1, 5];

impl GeneratorConfig {
    /// The architecture of the published checkpoints: 9 blocks, 64 filters.
    pub fn published(family: Family) -> Self {
        Self { family, ngf: 64, n_blocks: 9, norm_affine: false }
    }

    /// Every convolution in network order.
    pub fn layers(&self) -> Vec<GeneratorLayer> {
        let blocks = (0..self.n_blocks)
            .flat_map(|block| (0..2).map(move |conv| GeneratorLayer::Block { block, conv }));
        [GeneratorLayer::Stem, GeneratorLayer::Down(0), GeneratorLayer::Down(1)]
            .into_iter()
            .chain(blocks)
            .chain([GeneratorLayer::Up(0), GeneratorLayer::Up(1), GeneratorLayer::Head])
            .collect()
    }

    /// Index of a non-block layer's convolution in the top-level `nn.Sequential`.
    fn sequential_index(&self, layer: GeneratorLayer) -> usize {
        // 0 pad, 1 conv, 2 norm, 3 relu, then (conv, norm, relu) twice, then the blocks.
        let after_blocks = 10 + self.n_blocks;
        match (layer, self.family) {
            (GeneratorLayer::Stem, _) => 1,
            (GeneratorLayer::Down(i), _) => 4 + 3 * i,
            (GeneratorLayer::Block { block, .. }, _) => 10 + block,
            // Upsample, conv, norm, relu per stage; then pad, conv, tanh.
            (GeneratorLayer::Up(i), Family::Upsample) => after_blocks + 1 + 4 * i,
            (GeneratorLayer::Head, Family::Upsample) => after_blocks + 9,
            // ConvTranspose, norm, relu per stage; then pad, conv, tanh.
            (GeneratorLayer::Up(i), Family::Transpose) => after_blocks + 3 * i,
            (GeneratorLayer::Head, Family::Transpose) => after_blocks + 7,
        }
    }

    /// The key prefix of a layer's convolution: its tensors are `{prefix}.weight`/`.bias`.
    pub fn conv_key(&self, layer: GeneratorLayer) -> String {
        let index = self.sequential_index(layer);
        match layer {
            GeneratorLayer::Block { conv, .. } => {
                format!("model.{index}.{}.{}", self.family.block_name(), BLOCK_CONVS[conv])
            }
            _ => format!("model.{index}"),
        }
    }

    /// The key prefix of the instance norm after a layer's convolution (the next index); the
    /// head has none. Its tensors exist only when the norm is affine.
    pub fn norm_key(&self, layer: GeneratorLayer) -> Option<String> {
        let index = self.sequential_index(layer);
        match layer {
            GeneratorLayer::Head => None,
            GeneratorLayer::Block { conv, .. } => {
                Some(format!("model.{index}.{}.{}", self.family.block_name(), BLOCK_CONVS[conv] + 1))
            }
            _ => Some(format!("model.{}", index + 1)),
        }
    }

    /// Input and output channels of a layer's convolution.
    pub fn channels(&self, layer: GeneratorLayer) -> (usize, usize) {
        let ngf = self.ngf;
        match layer {
            GeneratorLayer::Stem => (3, ngf),
            GeneratorLayer::Down(i) => (ngf << i, ngf << (i + 1)),
            GeneratorLayer::Block { .. } => (4 * ngf, 4 * ngf),
            GeneratorLayer::Up(i) => ((4 * ngf) >> i, (2 * ngf) >> i),
            GeneratorLayer::Head => (ngf, 3),
        }
    }

    /// The PyTorch weight shape of a layer's convolution.
    pub fn weight_shape(&self, layer: GeneratorLayer) -> [usize; 4] {
        let (cin, cout) = self.channels(layer);
        match (layer, self.family) {
            (GeneratorLayer::Stem | GeneratorLayer::Head, _) => [cout, cin, 7, 7],
            // PyTorch stores transposed-conv weights as (in, out, k, k).
            (GeneratorLayer::Up(_), Family::Transpose) => [cin, cout, 3, 3],
            _ => [cout, cin, 3, 3],
        }
    }

    /// Every parameter the network has, in PyTorch naming, in network order.
    pub fn parameters(&self) -> Vec<ParamSpec> {
        let mut params = Vec::new();
        for layer in self.layers() {
            let (conv, cout) = (self.conv_key(layer), self.channels(layer).1);
            params.push(ParamSpec::new(format!("{conv}.weight"), self.weight_shape(layer)));
            params.push(ParamSpec::new(format!("{conv}.bias"), [cout]));
            if let Some(norm) = self.norm_key(layer).filter(|_| self.norm_affine) {
                params.push(ParamSpec::new(format!("{norm}.weight"), [cout]));
                params.push(ParamSpec::new(format!("{norm}.bias"), [cout]));
            }
        }
        params
    }

    pub fn parameter_count(&self) -> usize {
        self.parameters().iter().map(|p| p.shape.iter().product::<usize>()).sum()
    }

    /// Multiply-accumulates of one forward pass at `height`×`width` (a multiple of 4).
    pub fn macs(&self, height: usize, width: usize) -> u64 {
        let ngf = self.ngf as u64;
        let full = (height * width) as u64;
        let (half, quarter) = (full / 4, full / 16);
        let conv = |cin: u64, cout: u64, k: u64, pixels: u64| cin * cout * k * k * pixels;
        let mut macs = conv(3, ngf, 7, full)
            + conv(ngf, 2 * ngf, 3, half)
            + conv(2 * ngf, 4 * ngf, 3, quarter)
            + self.n_blocks as u64 * 2 * conv(4 * ngf, 4 * ngf, 3, quarter)
            + conv(ngf, 3, 7, full);
        macs += match self.family {
            Family::Upsample => conv(4 * ngf, 2 * ngf, 3, half) + conv(2 * ngf, ngf, 3, full),
            // Each input pixel of a stride-2 transposed conv meets every 3×3 tap once.
            Family::Transpose => conv(4 * ngf, 2 * ngf, 3, quarter) + conv(2 * ngf, ngf, 3, half),
        };
        macs
    }
}

/// The PatchGAN discriminator of the seed article: C64 C128 C256 C512, then a 1-channel conv.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiscriminatorConfig {
    pub ndf: usize,
}

impl DiscriminatorConfig {
    /// Sequential indices of the four strided convolutions and the final one.
    const CONV_INDICES: [usize; 5] = [0, 2, 5, 8, 12];

    /// The key prefix of convolution `i` (0–3 strided, 4 the final one).
    pub fn conv_key(i: usize) -> String {
        format!("model.{}", Self::CONV_INDICES[i])
    }

    pub fn parameters(&self) -> Vec<ParamSpec> {
        let n = self.ndf;
        let shapes = [[n, 3], [2 * n, n], [4 * n, 2 * n], [8 * n, 4 * n], [1, 8 * n]];
        shapes
            .into_iter()
            .enumerate()
            .flat_map(|(i, [cout, cin])| {
                let key = Self::conv_key(i);
                [
                    ParamSpec::new(format!("{key}.weight"), [cout, cin, 4, 4]),
                    ParamSpec::new(format!("{key}.bias"), [cout]),
                ]
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The published figures: 11,378,179 parameters in either family, 56.8 GMACs at 256² for
    /// the upsample family.
    #[test]
    fn published_generator_has_the_published_size() {
        let upsample = GeneratorConfig::published(Family::Upsample);
        let transpose = GeneratorConfig::published(Family::Transpose);
        assert_eq!(upsample.parameter_count(), 11_378_179);
        assert_eq!(transpose.parameter_count(), 11_378_179);
        let gmacs = upsample.macs(256, 256) as f64 / 1e9;
        assert!((gmacs - 56.8).abs() < 0.05, "{gmacs}");
        // The families differ only in their two upsampling stages. As 3×3 convolutions at the
        // output resolution (256→128 channels at 128², 128→64 at 256²) these take
        // 256·128·9·128² + 128·64·9·256² = 9,663,676,416 MACs; a stride-2 transposed convolution
        // meets each tap once per input pixel, a quarter of that: the transpose family does
        // three quarters of it less.
        let upsampling_convs: u64 = 9_663_676_416;
        assert_eq!(upsample.macs(256, 256) - transpose.macs(256, 256), upsampling_convs / 4 * 3);
    }

    #[test]
    fn display_names_the_whole_architecture() {
        let cfg = GeneratorConfig { family: Family::Transpose, ngf: 32, n_blocks: 6, norm_affine: true };
        assert_eq!(cfg.to_string(), "transpose family, ngf 32, 6 blocks, affine instance norm");
    }

    #[test]
    fn key_names_follow_each_family() {
        let up = GeneratorConfig { family: Family::Upsample, ngf: 8, n_blocks: 2, norm_affine: false };
        let names: Vec<_> = up.parameters().into_iter().map(|p| p.name).collect();
        assert!(names.contains(&"model.11.block.5.weight".to_string()));
        assert!(names.contains(&"model.21.bias".to_string()));
        let tr = GeneratorConfig { family: Family::Transpose, ngf: 8, n_blocks: 2, norm_affine: true };
        let params = tr.parameters();
        let shape = |k: &str| params.iter().find(|p| p.name == k).map(|p| p.shape.clone());
        assert_eq!(shape("model.12.weight"), Some(vec![32, 16, 3, 3]));
        assert_eq!(shape("model.12.bias"), Some(vec![16]));
        assert_eq!(shape("model.13.weight"), Some(vec![16]));
        assert_eq!(shape("model.10.conv_block.6.bias"), Some(vec![32]));
        assert_eq!(shape("model.19.weight"), Some(vec![3, 8, 7, 7]));
    }
}
