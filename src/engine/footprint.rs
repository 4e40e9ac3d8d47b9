//! What a request costs in memory at each stage, from its header alone, and what follows from
//! the budget: the largest image a model can take, and the size an oversized one shrinks to.

use super::codec::{self, ImageHeader};
use crate::model::pixels::padded_side;
use crate::model::{fast, Executor, GeneratorConfig};

/// The bytes one request holds while it is decoded, while it waits, and for its network pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Footprint {
    /// Decoder buffers and room for the encoded result (the body is reserved on its own).
    pub decoding: u64,
    /// Decoded image and room for the encoded result, until the response is written.
    pub waiting: u64,
    /// The network pass of this image alone.
    pub network: u64,
}

impl Footprint {
    /// The most it holds at once, whatever else runs.
    pub fn alone(&self) -> u64 {
        self.decoding.max(self.waiting + self.network)
    }
}

/// How one model's requests are costed.
#[derive(Clone, Copy, Debug)]
pub struct MemoryModel {
    pub architecture: GeneratorConfig,
    pub executor: Executor,
    /// Threads running convolutions, each with its own scratch.
    pub threads: usize,
}

impl MemoryModel {
    /// Host bytes of one batch's network pass at a padded size: the executor's own peak, the
    /// output copied out of its tensor, and the cropped result images.
    pub fn network_bytes(&self, batch: usize, padded_width: u32, padded_height: u32) -> u64 {
        let (w, h) = (padded_width as usize, padded_height as usize);
        let tensor = (batch * 3 * w * h * 4) as u64;
        let pass = match self.executor {
            Executor::FastCpu => {
                fast::memory::forward_peak_bytes(&self.architecture, batch, h, w, self.threads)
            }
            Executor::FastCpuBf16(_) => {
                fast::memory::forward_peak_bytes_amx(&self.architecture, batch, h, w, self.threads)
            }
            // The network runs in device memory; the host keeps the input and output tensors.
            Executor::Candle => 2 * tensor,
        };
        pass + tensor + (batch * w * h * 4) as u64
    }

    /// Network bytes per megapixel of padded size, at a square 1024².
    pub fn bytes_per_megapixel(&self) -> u64 {
        self.network_bytes(1, 1024, 1024) * 1_000_000 / (1024 * 1024)
    }

    /// The footprint of an image with `header`, fitted within `fit_side`.
    pub fn footprint(&self, header: &ImageHeader, fit_side: Option<u32>) -> Footprint {
        let (w, h) = header.fitted(fit_side);
        // The result: an RGBA image and its encoding (PNG can be a little larger than raw).
        let result = 2 * w as u64 * h as u64 * 4 + 64 * 1024;
        let decoded = codec::decoded_bytes(w, h, header.has_alpha);
        // Orientation is applied after the header is read: cost both ways round.
        let network = self.network_bytes(1, padded_side(w), padded_side(h)).max(self.network_bytes(
            1,
            padded_side(h),
            padded_side(w),
        ));
        Footprint {
            decoding: codec::decode_peak_bytes(header, fit_side) + result,
            waiting: decoded + result,
            network,
        }
    }

    /// The longest side at or under `longest` whose fitted image, decoded from `header`, needs
    /// at most `budget` bytes alone; `None` when even decoding the original does not fit.
    pub fn fit_side(&self, header: &ImageHeader, longest: u32, budget: u64) -> Option<u32> {
        let fits = |side: u32| self.footprint(header, Some(side)).alone() <= budget;
        if fits(longest) {
            return Some(longest);
        }
        let side = largest_fitting(longest, fits);
        (side > 0).then_some(side)
    }

    /// The largest square RGB image that fits `budget` alone, sent as up to `max_body` bytes.
    pub fn largest_square(&self, budget: u64, max_body: u64) -> u32 {
        let fits = |side: u32| {
            let body = max_body.min(3 * side as u64 * side as u64);
            body + self.footprint(&ImageHeader::rgb(side, side), None).alone() <= budget
        };
        largest_fitting(1 << 16, fits)
    }
}

/// The largest side under `too_large` that `fits` (0 if none does). Footprints grow with the
/// side, so a binary search finds it.
fn largest_fitting(too_large: u32, fits: impl Fn(u32) -> bool) -> u32 {
    let (mut lo, mut hi) = (0u32, too_large);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Family;

    fn shipped() -> MemoryModel {
        MemoryModel {
            architecture: GeneratorConfig {
                family: Family::Upsample,
                ngf: 32,
                n_blocks: 6,
                norm_affine: false,
            },
            executor: Executor::FastCpu,
            threads: 2,
        }
    }

    #[test]
    fn the_largest_square_fits_and_one_more_side_does_not() {
        let model = shipped();
        let budget = 1 << 30;
        let side = model.largest_square(budget, 20 << 20);
        assert!(side > 256, "a 1 GiB budget takes more than 256² ({side})");
        let cost = |s: u32| {
            model.footprint(&ImageHeader::rgb(s, s), None).alone() + (3 * s * s).min(20 << 20) as u64
        };
        assert!(cost(side) <= budget && cost(side + 1) > budget);
    }

    #[test]
    fn fitting_shrinks_an_oversized_image_until_it_fits() {
        let model = shipped();
        let budget = 512 << 20;
        let photo = ImageHeader::rgb(4000, 3000);
        assert!(model.footprint(&photo, None).alone() > budget, "a 12 MP photo needs more");
        let side = model.fit_side(&photo, 4000, budget).expect("a smaller version fits");
        assert!(side < 4000);
        assert!(model.footprint(&photo, Some(side)).alone() <= budget);
        assert!(model.footprint(&photo, Some(side + 1)).alone() > budget);
        assert_eq!(model.fit_side(&photo, 4000, 1 << 20), None, "1 MiB cannot even decode it");
    }
}
