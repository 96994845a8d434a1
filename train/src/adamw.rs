//! AdamW (Loshchilov & Hutter) as Burn's `AdamW` computes it, one pass per
//! parameter on `flex` (`posttrain_model::kernels::adamw`); Burn's own step
//! elsewhere. The state is Burn's `AdamWState`, so saved optimizer states
//! read back either way:
//! `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
//! `θ ← θ·(1 − lr·λ) − lr·(m/(1−β₁ᵗ)) / (√(v/(1−β₂ᵗ)) + ε)`.

use burn::optim::{AdamW, AdamWConfig, AdamWState, AdaptiveMomentumState, LearningRate, Optimizer};
use burn::tensor::{Device, Tensor};
use posttrain_model::kernels::adamw::{AdamWStep, Moments, adamw_step};
use posttrain_model::kernels::{HostF32, flex_f32};

#[derive(Clone)]
pub struct FusedAdamW {
    burn: AdamW,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
}

impl FusedAdamW {
    pub fn new(beta1: f32, beta2: f32, eps: f32, weight_decay: f32) -> Self {
        let burn = AdamWConfig::new()
            .with_beta_1(beta1)
            .with_beta_2(beta2)
            .with_epsilon(eps)
            .with_weight_decay(weight_decay)
            .build();
        Self {
            burn,
            beta1,
            beta2,
            eps,
            weight_decay,
        }
    }

    fn fused<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: &Tensor<D>,
        grad: &Tensor<D>,
        state: Option<&AdamWState<D>>,
    ) -> Option<(Tensor<D>, AdamWState<D>)> {
        let (p, g) = (HostF32::of(tensor)?, HostF32::of(grad)?);
        let moments = match state {
            Some(s) if s.momentum.max_moment_2.is_none() => Some((
                HostF32::of(&s.momentum.moment_1)?,
                HostF32::of(&s.momentum.moment_2)?,
                s.momentum.time + 1,
            )),
            Some(_) => return None,
            None => None,
        };
        let t = moments.as_ref().map_or(1, |m| m.2) as i32;
        let step = AdamWStep {
            lr: lr as f32,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            decay: (1.0 - lr * f64::from(self.weight_decay)) as f32,
            c1: 1.0 - self.beta1.powi(t),
            c2: 1.0 - self.beta2.powi(t),
        };
        let x = Moments {
            p: p.values(),
            m: moments.as_ref().map_or(&[][..], |m| m.0.values()),
            v: moments.as_ref().map_or(&[][..], |m| m.1.values()),
        };
        let (p, m, v) = adamw_step(&step, &x, g.values());
        let shape = tensor.dims();
        let momentum = AdaptiveMomentumState {
            time: t as usize,
            moment_1: flex_f32(m, shape),
            moment_2: flex_f32(v, shape),
            max_moment_2: None,
        };
        Some((flex_f32(p, shape), AdamWState { momentum }))
    }
}

impl Optimizer for FusedAdamW {
    type State<const D: usize> = AdamWState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        match self.fused(lr, &tensor, &grad, state.as_ref()) {
            Some((t, s)) => (t, Some(s)),
            None => self.burn.step(lr, tensor, grad, state),
        }
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        AdamW::to_device(state, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    fn t(v: &[f32]) -> Tensor<1> {
        Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), &Device::default())
    }

    fn vec(t: &Tensor<1>) -> Vec<f32> {
        t.clone().into_data().try_into_vec::<f32>().unwrap()
    }

    #[test]
    fn equals_burns_adamw_bit_for_bit() {
        let ours = FusedAdamW::new(0.9, 0.95, 1e-8, 0.1);
        let burn = ours.burn.clone();
        let n = 40_000;
        let p0: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
            .collect();
        let (mut a, mut b) = (t(&p0), t(&p0));
        let (mut sa, mut sb) = (None, None);
        for step in 0..4 {
            let g: Vec<f32> = (0..n)
                .map(|i| ((i * 13 + step * 7) % 29) as f32 / 7.0 - 2.0)
                .collect();
            let lr = 0.01 / (step + 1) as f64;
            assert!(
                ours.fused(lr, &a, &t(&g), sa.as_ref()).is_some(),
                "flex takes the fused step"
            );
            (a, sa) = ours.step(lr, a, t(&g), sa);
            (b, sb) = burn.step(lr, b, t(&g), sb);
            assert_eq!(vec(&a), vec(&b), "step {step}");
            let (ma, mb) = (
                &sa.as_ref().unwrap().momentum,
                &sb.as_ref().unwrap().momentum,
            );
            assert_eq!(ma.time, mb.time);
            assert_eq!(vec(&ma.moment_1), vec(&mb.moment_1));
            assert_eq!(vec(&ma.moment_2), vec(&mb.moment_2));
        }
        assert_ne!(vec(&a), p0);
    }
}
