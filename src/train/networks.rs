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
        self.set_vars(|name| Some(name.to_string()), tensors)
    }

    /// Sets one network's variables (`"G"`, `"F"`…) from tensors keyed by PyTorch name.
    pub fn load_network(&self, network: &str, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let prefix = format!("{network}.");
        self.set_vars(|name| name.strip_prefix(&prefix).map(str::to_string), tensors)
    }

    /// Sets each variable that `key` names a tensor for (by its full name, `G.model.1.weight`)
    /// from that tensor, which must be there.
    fn set_vars(
        &self,
        key: impl Fn(&str) -> Option<String>,
        tensors: &HashMap<String, Tensor>,
    ) -> Result<()> {
        for (name, var) in self.sorted_vars() {
            let Some(key) = key(&name) else { continue };
            let Some(t) = tensors.get(&key) else { candle_core::bail!("the weights lack {name}") };
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

/// `net` applied to each of `inputs`, in one pass over them stacked on the batch axis. Every
/// layer treats the samples of a batch independently (instance norm normalises per sample), so
/// this is the same function as separate passes; one pass prepares each layer's weights once
/// (the Winograd transforms), gives the products longer rows, and leaves one weight gradient per
/// layer to compute instead of one per pass.
fn batched_forward(net: &impl Module, inputs: &[&Tensor]) -> Result<Vec<Tensor>> {
    let out = net.forward(&Tensor::cat(inputs, 0)?)?;
    let mut start = 0;
    inputs
        .iter()
        .map(|input| {
            let len = input.dim(0)?;
            start += len;
            out.narrow(0, start - len, len)
        })
        .collect()
}

impl Networks {
    /// The generator half of the recipe. Its six generator applications run as three passes:
    /// F over (y, x) gives fake x and x's identity; G over (x, fake x, y) gives fake y, y's
    /// reconstruction and y's identity; F over fake y gives x's reconstruction.
    pub fn generator_losses(
        &self,
        real_x: &Tensor,
        real_y: &Tensor,
        w: LossWeights,
    ) -> Result<GeneratorLosses> {
        let with_identity = w.identity > 0.;
        let f_inputs: &[&Tensor] = if with_identity { &[real_y, real_x] } else { &[real_y] };
        let f_out = batched_forward(&self.f, f_inputs)?;
        let fake_x = f_out[0].clone();
        let g_inputs: &[&Tensor] =
            if with_identity { &[real_x, &fake_x, real_y] } else { &[real_x, &fake_x] };
        let g_out = batched_forward(&self.g, g_inputs)?;
        let (fake_y, rec_y) = (g_out[0].clone(), &g_out[1]);
        let rec_x = self.f.forward(&fake_y)?;

        let gan_g = lsgan(&self.d_y.forward(&fake_y)?, 1.)?;
        let gan_f = lsgan(&self.d_x.forward(&fake_x)?, 1.)?;
        let cycle_x = (l1(&rec_x, real_x)? * w.cycle)?;
        let cycle_y = (l1(rec_y, real_y)? * w.cycle)?;
        let (identity_x, identity_y) = if with_identity {
            let scale = w.cycle * w.identity;
            ((l1(&f_out[1], real_x)? * scale)?, (l1(&g_out[2], real_y)? * scale)?)
        } else {
            let zero = Tensor::zeros((), DType::F32, real_x.device())?;
            (zero.clone(), zero)
        };
        let total = (((&gan_g + &gan_f)? + (&cycle_x + &cycle_y)?)? + (&identity_x + &identity_y)?)?;
        Ok(GeneratorLosses { gan_g, gan_f, cycle_x, cycle_y, identity_x, identity_y, total, fake_x, fake_y })
    }

    /// Each discriminator's loss, `(MSE(D(real), 1) + MSE(D(fake), 0)) / 2`; `fake_*` come from
    /// the image pools, detached. Each discriminator scores its real and fake images in one pass.
    pub fn discriminator_losses(
        &self,
        real_x: &Tensor,
        real_y: &Tensor,
        fake_x: &Tensor,
        fake_y: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let loss = |d: &Discriminator, real: &Tensor, fake: &Tensor| -> Result<Tensor> {
            let scores = batched_forward(d, &[real, fake])?;
            (lsgan(&scores[0], 1.)? + lsgan(&scores[1], 0.)?)? * 0.5
        };
        Ok((loss(&self.d_x, real_x, fake_x)?, loss(&self.d_y, real_y, fake_y)?))
    }
}
