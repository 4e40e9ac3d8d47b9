//! The image pool of Shrivastava et al., as CycleGAN uses it: discriminators see a mix of the
//! newest fakes and up to `capacity` older ones, which steadies their training.

use candle_core::{Result, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

pub struct ImagePool {
    capacity: usize,
    /// Detached CHW images.
    images: Vec<Tensor>,
}

impl ImagePool {
    pub fn new(capacity: usize) -> Self {
        Self { capacity, images: Vec::with_capacity(capacity) }
    }

    /// For each image of the NCHW `batch`: while the pool fills, store it and return it; after
    /// that, with probability ½ return it unchanged, otherwise swap it for a random stored one.
    pub fn query(&mut self, batch: &Tensor, rng: &mut ChaCha8Rng) -> Result<Tensor> {
        let batch = batch.detach();
        if self.capacity == 0 {
            return Ok(batch);
        }
        let mut out = Vec::with_capacity(batch.dim(0)?);
        for i in 0..batch.dim(0)? {
            let image = batch.get(i)?;
            if self.images.len() < self.capacity {
                self.images.push(image.clone());
                out.push(image);
            } else if rng.random::<f64>() > 0.5 {
                let slot = rng.random_range(0..self.capacity);
                out.push(std::mem::replace(&mut self.images[slot], image));
            } else {
                out.push(image);
            }
        }
        Tensor::stack(&out, 0)
    }

    pub fn images(&self) -> &[Tensor] {
        &self.images
    }

    /// Restores the pool's contents from a checkpoint.
    pub fn restore(&mut self, images: Vec<Tensor>) {
        self.images = images;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use rand::SeedableRng;

    fn image(v: f32) -> Tensor {
        Tensor::full(v, (1, 1, 2, 2), &Device::Cpu).unwrap()
    }

    fn value(t: &Tensor) -> f32 {
        t.flatten_all().unwrap().get(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn returns_the_query_while_filling_then_mixes_in_old_images() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut pool = ImagePool::new(3);
        for v in 0..3 {
            assert_eq!(value(&pool.query(&image(v as f32), &mut rng).unwrap()), v as f32);
        }
        let returned: Vec<f32> =
            (3..200).map(|v| value(&pool.query(&image(v as f32), &mut rng).unwrap())).collect();
        let old = returned.iter().enumerate().filter(|(i, v)| **v != (*i + 3) as f32).count();
        assert!((60..140).contains(&old), "about half should be older images, got {old} of 197");
        assert_eq!(pool.images().len(), 3);
        assert_eq!(pool.images()[0].dtype(), DType::F32);
    }

    #[test]
    fn a_zero_capacity_pool_passes_images_through() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut pool = ImagePool::new(0);
        assert_eq!(value(&pool.query(&image(7.), &mut rng).unwrap()), 7.);
        assert!(pool.images().is_empty());
    }
}
