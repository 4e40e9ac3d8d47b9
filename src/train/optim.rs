//! Adam, written out so that its moments can be checkpointed (candle-nn's keeps them private)
//! and so that its arithmetic is PyTorch's `torch.optim.Adam` step for step.
//!
//! On the CPU in f32 each parameter's update is two passes in place (moments, then parameter),
//! with the same roundings as the candle-op form other devices use, which took ten passes and
//! ten allocations.

use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor, Var};
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
                // Separate storage each: the CPU update writes the moments in place.
                let (m, v) = (param.as_tensor().zeros_like()?, param.as_tensor().zeros_like()?);
                slots.push(Slot { name: format!("{prefix}.{name}"), param, m, v });
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
        self.steps += 1;
        let update = self.update();
        for slot in &mut self.slots {
            let Some(g) = grads.get(slot.param.as_tensor()) else {
                candle_core::bail!("no gradient for {}", slot.name)
            };
            if on_fused_path(slot.param.as_tensor()) {
                update.in_place(slot, &g.contiguous()?)?;
            } else {
                update.composed(slot, g)?;
            }
        }
        Ok(())
    }

    fn update(&self) -> Update {
        let AdamConfig { beta1, beta2, eps, .. } = self.config;
        let t = self.steps as i32;
        Update {
            beta1,
            beta2,
            eps,
            step_size: self.lr / (1. - beta1.powi(t)),
            sqrt_bias_correction2: (1. - beta2.powi(t)).sqrt(),
        }
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
            // Copies, so that in-place updates never reach the caller's tensors.
            slot.m = get(&format!("m.{}", slot.name))?.copy()?;
            slot.v = get(&format!("v.{}", slot.name))?.copy()?;
        }
        self.steps = steps;
        Ok(())
    }
}

fn on_fused_path(param: &Tensor) -> bool {
    param.device().is_cpu() && param.dtype() == DType::F32
}

/// The constants of one step.
#[derive(Clone, Copy, Debug)]
struct Update {
    beta1: f64,
    beta2: f64,
    eps: f64,
    /// lr / (1 − β₁ᵗ).
    step_size: f64,
    /// √(1 − β₂ᵗ).
    sqrt_bias_correction2: f64,
}

impl Update {
    /// m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g², p ← p − step_size · m / (√v / √(1−β₂ᵗ) + ε), each
    /// product rounded as candle's `affine` rounds it in the composed form.
    fn in_place(&self, slot: &Slot, g: &Tensor) -> Result<()> {
        slot.m.inplace_op2(g, &Moment { decay: self.beta1, square: false })?;
        slot.v.inplace_op2(g, &Moment { decay: self.beta2, square: true })?;
        slot.param.as_tensor().inplace_op3(&slot.m, &slot.v, self)
    }

    fn composed(&self, slot: &mut Slot, g: &Tensor) -> Result<()> {
        slot.m = ((&slot.m * self.beta1)? + (g * (1. - self.beta1))?)?;
        slot.v = ((&slot.v * self.beta2)? + (g.sqr()? * (1. - self.beta2))?)?;
        let denom = ((slot.v.sqrt()? / self.sqrt_bias_correction2)? + self.eps)?;
        let update = ((&slot.m / denom)? * self.step_size)?;
        slot.param.set(&slot.param.as_tensor().sub(&update)?)
    }
}

fn slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(values), Some((start, end))) => Ok(&values[start..end]),
        _ => candle_core::bail!("adam: contiguous f32 expected"),
    }
}

fn slice_mut<'a>(storage: &'a mut CpuStorage, layout: &Layout) -> Result<&'a mut [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(values), Some((start, end))) => Ok(&mut values[start..end]),
        _ => candle_core::bail!("adam: contiguous f32 expected"),
    }
}

/// A moment estimate's decay step, in place: x ← decay·x + (1−decay)·(g or g²).
struct Moment {
    decay: f64,
    square: bool,
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adam-moment"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        let (decay, rest) = (self.decay as f32, (1. - self.decay) as f32);
        let (moment, g) = (slice_mut(s1, l1)?, slice(s2, l2)?);
        if moment.len() != g.len() {
            candle_core::bail!("adam: {} moments for {} gradients", moment.len(), g.len())
        }
        for (x, &g) in moment.iter_mut().zip(g) {
            let g = if self.square { g * g } else { g };
            *x = *x * decay + g * rest;
        }
        Ok(())
    }
}

impl InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "adam-apply"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let inv_correction = (1. / self.sqrt_bias_correction2) as f32;
        let (eps, step_size) = (self.eps as f32, self.step_size as f32);
        let (param, m, v) = (slice_mut(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        if param.len() != m.len() || param.len() != v.len() {
            candle_core::bail!("adam: {} parameters, {} and {} moments", param.len(), m.len(), v.len())
        }
        for ((p, &m), &v) in param.iter_mut().zip(m).zip(v) {
            *p -= m / (v.sqrt() * inv_correction + eps) * step_size;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
    }

    /// The in-place CPU update and the candle-op form agree bit for bit over several steps, on a
    /// length that is no multiple of any vector width.
    #[test]
    fn in_place_update_equals_the_composed_one() {
        let config = AdamConfig { lr: 2e-4, beta1: 0.5, beta2: 0.999, eps: 1e-8 };
        let slot = || {
            let values = Tensor::arange(0f32, 1003., &Device::Cpu).unwrap().sin().unwrap();
            let param = Var::from_tensor(&values).unwrap();
            let (m, v) = (values.zeros_like().unwrap(), values.zeros_like().unwrap());
            Slot { name: "w".into(), param, m, v }
        };
        let (fused, mut composed) = (slot(), slot());
        for t in 1..=4 {
            let adam = Adam { config, lr: config.lr, slots: vec![], steps: t };
            let g = (Tensor::arange(0f32, 1003., &Device::Cpu).unwrap() * (0.37 * t as f64))
                .unwrap()
                .cos()
                .unwrap();
            adam.update().in_place(&fused, &g).unwrap();
            adam.update().composed(&mut composed, &g).unwrap();
            for (a, b) in [(&fused.m, &composed.m), (&fused.v, &composed.v)] {
                assert_eq!(bits(a), bits(b), "step {t}: moments differ");
            }
            assert_eq!(
                bits(fused.param.as_tensor()),
                bits(composed.param.as_tensor()),
                "step {t}: parameters differ"
            );
        }
        assert_ne!(
            bits(fused.param.as_tensor()),
            bits(slot().param.as_tensor()),
            "the parameters never moved"
        );
    }
}
