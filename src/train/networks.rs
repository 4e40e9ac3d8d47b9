//! The four CycleGAN networks as trainable variables, and the losses of the recipe.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::model::{Discriminator, DiscriminatorConfig, Generator, GeneratorConfig};

/// Checkpoint prefixes of the networks: G maps X→Y, F maps Y→X, D_X judges X, D_Y judges Y.
pub const NETWORK_NAMES: [&str; 4] = ["G", "F", "D_X", "D_Y"];

pub struct Networks {
    pub g: Generator,
    pub f: Generator,
    pub d_x: Discriminator,
    pub d_y: Discriminator,
    /// Variables of G, F, D_X, D_Y in [`NETWORK_NAMES`] order.
    pub vars: [VarMap; 4],
}

impl Networks {
    pub fn new(
        generator: GeneratorConfig,
        discriminator: DiscriminatorConfig,
        device: &Device,
    ) -> Result<Self> {
        let vars: [VarMap; 4] = std::array::from_fn(|_| VarMap::new());
        let vb = |i: usize| VarBuilder::from_varmap(&vars[i], DType::F32, device);
        Ok(Self {
            g: Generator::new(generator, vb(0))?,
            f: Generator::new(generator, vb(1))?,
            d_x: Discriminator::new(discriminator, vb(2))?,
            d_y: Discriminator::new(discriminator, vb(3))?,
            vars,
        })
    }

    /// The original CycleGAN initialisation: every (transposed) convolution weight from
    /// N(0, 0.02), biases 0, affine instance-norm scales 1. Seeded, so runs repeat exactly.
    pub fn init_normal(&self, seed: u64) -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let normal = Normal::new(0f32, 0.02).expect("valid normal distribution");
        for (name, var) in self.sorted_vars() {
            let tensor = var.as_tensor();
            let value = if tensor.rank() == 4 {
                let values: Vec<f32> = (0..tensor.elem_count()).map(|_| normal.sample(&mut rng)).collect();
                Tensor::from_vec(values, tensor.dims(), tensor.device())?
            } else if name.ends_with(".weight") {
                // A 1-D weight is an instance-norm scale.
                tensor.ones_like()?
            } else {
                tensor.zeros_like()?
            };
            var.set(&value)?;
        }
        Ok(())
    }

    /// Every variable with its checkpoint name (`G.model.1.weight`…), in a stable order.
    pub fn sorted_vars(&self) -> Vec<(String, candle_core::Var)> {
        let mut all = Vec::new();
        for (prefix, varmap) in NETWORK_NAMES.iter().zip(&self.vars) {
            let data = varmap.data().lock().expect("var map lock poisoned");
            let mut names: Vec<&String> = data.keys().collect();
            names.sort();
            all.extend(names.into_iter().map(|n| (format!("{prefix}.{n}"), data[n].clone())));
        }
        all
    }

    /// Sets every variable from tensors named as [`Networks::sorted_vars`] names them.
    pub fn load(&self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        for (name, var) in self.sorted_vars() {
            let Some(t) = tensors.get(&name) else { candle_core::bail!("checkpoint lacks {name}") };
            var.set(&t.to_dtype(DType::F32)?.to_device(var.device())?)?;
        }
        Ok(())
    }

    /// Current weights of one network (`"G"`, `"F"`…), keyed by PyTorch name.
    pub fn weights(&self, network: &str) -> HashMap<String, Tensor> {
        let i = NETWORK_NAMES.iter().position(|n| *n == network).expect("known network name");
        let data = self.vars[i].data().lock().expect("var map lock poisoned");
        data.iter().map(|(k, v)| (k.clone(), v.as_tensor().detach())).collect()
    }
}

/// Loss weights of the recipe.
#[derive(Clone, Copy, Debug)]
pub struct LossWeights {
    pub cycle: f64,
    /// Fraction of `cycle` given to the identity loss.
    pub identity: f64,
}

/// The generators' losses for one batch, each already weighted, and the fakes made on the way.
pub struct GeneratorLosses {
    pub gan_g: Tensor,
    pub gan_f: Tensor,
    pub cycle_x: Tensor,
    pub cycle_y: Tensor,
    pub identity_x: Tensor,
    pub identity_y: Tensor,
    pub total: Tensor,
    pub fake_x: Tensor,
    pub fake_y: Tensor,
}

/// LSGAN: mean squared distance of the patch scores from the target label.
fn lsgan(scores: &Tensor, target: f64) -> Result<Tensor> {
    (scores - target)?.sqr()?.mean_all()
}

fn l1(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    (a - b)?.abs()?.mean_all()
}

impl Networks {
    pub fn generator_losses(
        &self,
        real_x: &Tensor,
        real_y: &Tensor,
        w: LossWeights,
    ) -> Result<GeneratorLosses> {
        let fake_y = self.g.forward(real_x)?;
        let fake_x = self.f.forward(real_y)?;
        let gan_g = lsgan(&self.d_y.forward(&fake_y)?, 1.)?;
        let gan_f = lsgan(&self.d_x.forward(&fake_x)?, 1.)?;
        let cycle_x = (l1(&self.f.forward(&fake_y)?, real_x)? * w.cycle)?;
        let cycle_y = (l1(&self.g.forward(&fake_x)?, real_y)? * w.cycle)?;
        let (identity_x, identity_y) = if w.identity > 0. {
            let scale = w.cycle * w.identity;
            (
                (l1(&self.f.forward(real_x)?, real_x)? * scale)?,
                (l1(&self.g.forward(real_y)?, real_y)? * scale)?,
            )
        } else {
            let zero = Tensor::zeros((), DType::F32, real_x.device())?;
            (zero.clone(), zero)
        };
        let total = (((&gan_g + &gan_f)? + (&cycle_x + &cycle_y)?)? + (&identity_x + &identity_y)?)?;
        Ok(GeneratorLosses { gan_g, gan_f, cycle_x, cycle_y, identity_x, identity_y, total, fake_x, fake_y })
    }

    /// Each discriminator's loss, `(MSE(D(real), 1) + MSE(D(fake), 0)) / 2`; `fake_*` come from
    /// the image pools, detached.
    pub fn discriminator_losses(
        &self,
        real_x: &Tensor,
        real_y: &Tensor,
        fake_x: &Tensor,
        fake_y: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let d_x = ((lsgan(&self.d_x.forward(real_x)?, 1.)? + lsgan(&self.d_x.forward(fake_x)?, 0.)?)? * 0.5)?;
        let d_y = ((lsgan(&self.d_y.forward(real_y)?, 1.)? + lsgan(&self.d_y.forward(fake_y)?, 0.)?)? * 0.5)?;
        Ok((d_x, d_y))
    }
}
