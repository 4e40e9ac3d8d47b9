//! Adam, written out so that its moments can be checkpointed (candle-nn's keeps them private)
//! and so that its arithmetic is PyTorch's `torch.optim.Adam` step for step.

use candle_core::{Result, Tensor, Var};
use candle_nn::VarMap;

#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

/// One parameter and its first and second moment estimates.
struct Slot {
    name: String,
    param: Var,
    m: Tensor,
    v: Tensor,
}

pub struct Adam {
    config: AdamConfig,
    /// The learning rate now in force (the schedule scales `config.lr`).
    lr: f64,
    slots: Vec<Slot>,
    /// Completed steps; the bias corrections depend on it.
    steps: u64,
}

impl Adam {
    /// Optimises every variable of the given maps; names are `prefix.param_name`.
    pub fn new(config: AdamConfig, networks: &[(&str, &VarMap)]) -> Result<Self> {
        let mut slots = Vec::new();
        for (prefix, varmap) in networks {
            let data = varmap.data().lock().expect("var map lock poisoned");
            let mut names: Vec<&String> = data.keys().collect();
            names.sort();
            for name in names {
                let param = data[name].clone();
                let zeros = param.as_tensor().zeros_like()?;
                slots.push(Slot { name: format!("{prefix}.{name}"), param, m: zeros.clone(), v: zeros });
            }
        }
        Ok(Self { config, lr: config.lr, slots, steps: 0 })
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    pub fn lr(&self) -> f64 {
        self.lr
    }

    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// One update from the gradients in `grads`; parameters without a gradient stay as they are
    /// (their moments decay as PyTorch's would not, so every parameter here must get one).
    pub fn step(&mut self, grads: &candle_core::backprop::GradStore) -> Result<()> {
        let AdamConfig { beta1, beta2, eps, .. } = self.config;
        self.steps += 1;
        let t = self.steps as i32;
        let step_size = self.lr / (1. - beta1.powi(t));
        let sqrt_bias_correction2 = (1. - beta2.powi(t)).sqrt();
        for slot in &mut self.slots {
            let Some(g) = grads.get(slot.param.as_tensor()) else {
                candle_core::bail!("no gradient for {}", slot.name)
            };
            slot.m = ((&slot.m * beta1)? + (g * (1. - beta1))?)?;
            slot.v = ((&slot.v * beta2)? + (g.sqr()? * (1. - beta2))?)?;
            let denom = ((slot.v.sqrt()? / sqrt_bias_correction2)? + eps)?;
            let update = ((&slot.m / denom)? * step_size)?;
            slot.param.set(&slot.param.as_tensor().sub(&update)?)?;
        }
        Ok(())
    }

    /// The moments as named tensors (`m.NAME`, `v.NAME`), for checkpoints.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.slots
            .iter()
            .flat_map(|s| [(format!("m.{}", s.name), s.m.clone()), (format!("v.{}", s.name), s.v.clone())])
            .collect()
    }

    /// Restores moments and the step count saved by [`Adam::state`].
    pub fn load_state(&mut self, steps: u64, get: impl Fn(&str) -> Result<Tensor>) -> Result<()> {
        for slot in &mut self.slots {
            slot.m = get(&format!("m.{}", slot.name))?;
            slot.v = get(&format!("v.{}", slot.name))?;
        }
        self.steps = steps;
        Ok(())
    }
}
