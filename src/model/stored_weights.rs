//! How a model file stores its weights: f32, f16, bf16, or int8 convolution kernels.
//!
//! Int8 stores each slice along a kernel's first axis (a convolution's output channel, a
//! transposed convolution's input channel) as integers in −127..=127 beside one f32 scale per
//! slice, `w ≈ scale · q`, with `scale = max |w| / 127` over the slice. The scale tensor is named
//! after its kernel with [`SCALE_SUFFIX`] and shaped `[slices, 1, 1, 1]`, so `scale * q` is a
//! broadcast product in any array library. Biases and norm parameters, a few kilobytes, stay f32.
//! The file is then a quarter of f32's size and half of f16's: the published architecture's two
//! generators are 23 MB instead of 45.5 MB in f16. Every format is widened to f32 on load.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Tensor};
use safetensors::{Dtype, View};

/// Suffix of the tensor that holds an int8 kernel's per-slice scales.
pub const SCALE_SUFFIX: &str = "_scale";

/// The largest magnitude an int8 kernel stores; −128 is left out so the range is symmetric.
const INT8_MAX: f32 = 127.0;

/// The storage a model file is written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightStorage {
    F32,
    F16,
    Bf16,
    /// Int8 convolution kernels with a f32 scale per output channel; everything else f32.
    Int8,
}

impl WeightStorage {
    pub const ALL: [WeightStorage; 4] = [Self::F32, Self::F16, Self::Bf16, Self::Int8];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Int8 => "int8",
        }
    }

    /// The tensors that store `tensor` (an f32 weight named `name`) in this storage.
    pub(crate) fn encode(
        self,
        name: &str,
        tensor: &Tensor,
    ) -> candle_core::Result<Vec<(String, StoredTensor)>> {
        let float = |dtype: DType| -> candle_core::Result<StoredTensor> {
            let tensor = tensor.to_dtype(dtype)?.contiguous()?;
            Ok(StoredTensor {
                dtype: View::dtype(&tensor),
                shape: tensor.dims().to_vec(),
                bytes: tensor.data().into_owned(),
            })
        };
        Ok(match self {
            Self::F32 => vec![(name.to_string(), float(DType::F32)?)],
            Self::F16 => vec![(name.to_string(), float(DType::F16)?)],
            Self::Bf16 => vec![(name.to_string(), float(DType::BF16)?)],
            Self::Int8 if tensor.rank() == 4 => {
                let shape = tensor.dims().to_vec();
                let values = tensor.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let Int8Kernel { values, scales } = Int8Kernel::quantize(&values, shape[0]);
                let scale_shape = vec![shape[0], 1, 1, 1];
                vec![
                    (
                        name.to_string(),
                        StoredTensor {
                            dtype: Dtype::I8,
                            shape,
                            bytes: values.iter().map(|&q| q as u8).collect(),
                        },
                    ),
                    (
                        format!("{name}{SCALE_SUFFIX}"),
                        StoredTensor {
                            dtype: Dtype::F32,
                            shape: scale_shape,
                            bytes: scales.iter().flat_map(|s| s.to_le_bytes()).collect(),
                        },
                    ),
                ]
            }
            Self::Int8 => vec![(name.to_string(), float(DType::F32)?)],
        })
    }
}

impl fmt::Display for WeightStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for WeightStorage {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|w| w.as_str() == s).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|w| w.as_str()).collect();
            format!("unknown weight storage `{s}`: expected one of {}", names.join(", "))
        })
    }
}

/// One tensor as the file stores it: safetensors' dtype, shape and little-endian bytes.
pub(crate) struct StoredTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &StoredTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }

    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// A kernel in int8 with one scale per slice along its first axis.
#[derive(Debug, PartialEq)]
pub(crate) struct Int8Kernel {
    pub values: Vec<i8>,
    pub scales: Vec<f32>,
}

impl Int8Kernel {
    /// Rounds each of the `slices` equal runs of `weights` to the nearest multiple of its scale,
    /// so no weight moves by more than half a step. An all-zero slice gets scale 1.
    pub fn quantize(weights: &[f32], slices: usize) -> Self {
        let per_slice = weights.len() / slices.max(1);
        let mut values = Vec::with_capacity(weights.len());
        let mut scales = Vec::with_capacity(slices);
        for slice in weights.chunks(per_slice.max(1)) {
            let largest = slice.iter().fold(0f32, |m, w| m.max(w.abs()));
            let scale = if largest > 0.0 { largest / INT8_MAX } else { 1.0 };
            values.extend(slice.iter().map(|w| (w / scale).round().clamp(-INT8_MAX, INT8_MAX) as i8));
            scales.push(scale);
        }
        Self { values, scales }
    }

    /// The f32 weights, `scale · q` slice by slice.
    pub fn dequantize(&self) -> Vec<f32> {
        let per_slice = self.values.len() / self.scales.len().max(1);
        self.values
            .chunks(per_slice.max(1))
            .zip(&self.scales)
            .flat_map(|(slice, &scale)| slice.iter().map(move |&q| scale * f32::from(q)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int8_rounds_each_weight_within_half_a_step_of_its_slice() {
        // Slices of very different ranges, one of them all zeros, an odd length per slice.
        let slices = 5;
        let per_slice = 3 * 3 * 7;
        let weights: Vec<f32> = (0..slices * per_slice)
            .map(|i| {
                let range = [1e-4, 0.03, 0.0, 2.5, 0.6][i / per_slice];
                range * (((i * 7919) % 101) as f32 / 50.0 - 1.0)
            })
            .collect();
        let kernel = Int8Kernel::quantize(&weights, slices);
        assert_eq!(kernel.values.len(), weights.len());
        assert_eq!(kernel.scales.len(), slices);
        let restored = kernel.dequantize();
        // Half a step, with room for f32 rounding when a weight lies exactly between two steps.
        for (i, (w, r)) in weights.iter().zip(&restored).enumerate() {
            let scale = kernel.scales[i / per_slice];
            assert!(
                (w - r).abs() <= scale * 0.5 * (1.0 + 1e-3),
                "weight {i}: {w} became {r} (scale {scale})"
            );
        }
        // The slice's extreme lands exactly on ±127 steps, so the range is used in full.
        let slice = &kernel.values[3 * per_slice..4 * per_slice];
        assert_eq!(slice.iter().map(|q| q.unsigned_abs()).max(), Some(127));
        assert!(kernel.values[2 * per_slice..3 * per_slice].iter().all(|&q| q == 0));
    }

    #[test]
    fn storage_names_parse_back() {
        for storage in WeightStorage::ALL {
            assert_eq!(storage.as_str().parse::<WeightStorage>(), Ok(storage));
        }
        assert!("fp8".parse::<WeightStorage>().unwrap_err().contains("f32, f16, bf16, int8"));
    }
}
