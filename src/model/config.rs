//! Architecture descriptions, and the PyTorch parameter names and shapes they imply.
//!
//! The parameter list here is the single source of truth for key names: model files are checked
//! against it, `.pth` imports are mapped through it, and the networks consume exactly these keys
//! (a test holds them together).

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
pub type ParamSpec = (String, Vec<usize>);

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

/// Positions in the generator's top-level `nn.Sequential`, which give the PyTorch key names.
pub(crate) struct GeneratorIndices {
    pub stem: usize,
    pub down: [usize; 2],
    pub first_block: usize,
    /// Index of each upsampling stage's convolution (plain or transposed).
    pub up: [usize; 2],
    pub head: usize,
}

impl GeneratorConfig {
    /// The architecture of the published checkpoints: 9 blocks, 64 filters.
    pub fn published(family: Family) -> Self {
        Self { family, ngf: 64, n_blocks: 9, norm_affine: false }
    }

    pub(crate) fn indices(&self) -> GeneratorIndices {
        // 0 pad, 1 conv, 2 norm, 3 relu, then (conv, norm, relu) twice, then the blocks.
        let after_blocks = 10 + self.n_blocks;
        let (up, head) = match self.family {
            // Upsample, conv, norm, relu per stage; then pad, conv, tanh.
            Family::Upsample => ([after_blocks + 1, after_blocks + 5], after_blocks + 9),
            // ConvTranspose, norm, relu per stage; then pad, conv, tanh.
            Family::Transpose => ([after_blocks, after_blocks + 3], after_blocks + 7),
        };
        GeneratorIndices { stem: 1, down: [4, 7], first_block: 10, up, head }
    }

    /// Every parameter the network has, in PyTorch naming, in network order.
    pub fn parameters(&self) -> Vec<ParamSpec> {
        let ngf = self.ngf;
        let idx = self.indices();
        let mut params = Vec::new();
        let mut conv = |index: String, weight: [usize; 4], out_channels: usize| {
            params.push((format!("model.{index}.weight"), weight.to_vec()));
            params.push((format!("model.{index}.bias"), vec![out_channels]));
        };
        conv(idx.stem.to_string(), [ngf, 3, 7, 7], ngf);
        conv(idx.down[0].to_string(), [2 * ngf, ngf, 3, 3], 2 * ngf);
        conv(idx.down[1].to_string(), [4 * ngf, 2 * ngf, 3, 3], 4 * ngf);
        let block = self.family.block_name();
        for b in 0..self.n_blocks {
            for layer in [1, 5] {
                let index = format!("{}.{block}.{layer}", idx.first_block + b);
                conv(index, [4 * ngf, 4 * ngf, 3, 3], 4 * ngf);
            }
        }
        for (stage, &i) in idx.up.iter().enumerate() {
            let (cin, cout) = ((4 * ngf) >> stage, (2 * ngf) >> stage);
            // PyTorch stores transposed-conv weights as (in, out, k, k).
            let weight = match self.family {
                Family::Upsample => [cout, cin, 3, 3],
                Family::Transpose => [cin, cout, 3, 3],
            };
            conv(i.to_string(), weight, cout);
        }
        conv(idx.head.to_string(), [3, ngf, 7, 7], 3);
        if self.norm_affine {
            for (name, channels) in self.norm_layers() {
                params.push((format!("{name}.weight"), vec![channels]));
                params.push((format!("{name}.bias"), vec![channels]));
            }
        }
        params
    }

    /// Names and widths of the instance-norm layers (they carry parameters only when affine).
    pub(crate) fn norm_layers(&self) -> Vec<(String, usize)> {
        let ngf = self.ngf;
        let idx = self.indices();
        let mut layers = vec![
            (format!("model.{}", idx.stem + 1), ngf),
            (format!("model.{}", idx.down[0] + 1), 2 * ngf),
            (format!("model.{}", idx.down[1] + 1), 4 * ngf),
        ];
        let block = self.family.block_name();
        for b in 0..self.n_blocks {
            for layer in [2, 6] {
                layers.push((format!("model.{}.{block}.{layer}", idx.first_block + b), 4 * ngf));
            }
        }
        for (stage, &i) in idx.up.iter().enumerate() {
            layers.push((format!("model.{}", i + 1), (2 * ngf) >> stage));
        }
        layers
    }

    pub fn parameter_count(&self) -> usize {
        self.parameters().iter().map(|(_, s)| s.iter().product::<usize>()).sum()
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
    pub(crate) const CONV_INDICES: [usize; 5] = [0, 2, 5, 8, 12];

    pub fn parameters(&self) -> Vec<ParamSpec> {
        let n = self.ndf;
        let shapes = [[n, 3], [2 * n, n], [4 * n, 2 * n], [8 * n, 4 * n], [1, 8 * n]];
        Self::CONV_INDICES
            .iter()
            .zip(shapes)
            .flat_map(|(i, [cout, cin])| {
                [
                    (format!("model.{i}.weight"), vec![cout, cin, 4, 4]),
                    (format!("model.{i}.bias"), vec![cout]),
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
        let names: Vec<_> = up.parameters().into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"model.11.block.5.weight".to_string()));
        assert!(names.contains(&"model.21.bias".to_string()));
        let tr = GeneratorConfig { family: Family::Transpose, ngf: 8, n_blocks: 2, norm_affine: true };
        let params = tr.parameters();
        let shape = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, s)| s.clone());
        assert_eq!(shape("model.12.weight"), Some(vec![32, 16, 3, 3]));
        assert_eq!(shape("model.12.bias"), Some(vec![16]));
        assert_eq!(shape("model.13.weight"), Some(vec![16]));
        assert_eq!(shape("model.10.conv_block.6.bias"), Some(vec![32]));
        assert_eq!(shape("model.19.weight"), Some(vec![3, 8, 7, 7]));
    }
}
