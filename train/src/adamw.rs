//! AdamW (Loshchilov & Hutter) as Burn's `AdamW` computes it, one pass per
//! parameter on `flex`, in place (`posttrain_model::kernels::adamw`); Burn's
//! own step elsewhere. The state is Burn's `AdamWState`, so saved optimizer states
//! read back either way:
//! `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
//! `θ ← θ·(1 − lr·λ) − lr·(m/(1−β₁ᵗ)) / (√(v/(1−β₂ᵗ)) + ε)`.

use burn::optim::{AdamW, AdamWConfig, AdamWState, AdaptiveMomentumState, LearningRate, Optimizer};
use burn::tensor::{Device, Tensor};
use posttrain_model::kernels::adamw::{AdamWStep, adamw_step};
use posttrain_model::kernels::{HostF32, OwnedF32, flex_f32};

/// A parameter and its optimizer state, as a step takes them.
type Operands<const D: usize> = (Tensor<D>, Option<AdamWState<D>>);

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

    /// The fused step, in place on the parameter and moments where nothing
    /// else holds them; `Err` gives the operands back where it does not
    /// apply (another backend or dtype, AMSGrad state).
    fn fused<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: &Tensor<D>,
        state: Option<AdamWState<D>>,
    ) -> Result<(Tensor<D>, AdamWState<D>), Box<Operands<D>>> {
        let Some(g) = HostF32::of(grad) else {
            return Err(Box::new((tensor, state)));
        };
        let n = g.values().len();
        let fits = |t: &Tensor<D>| OwnedF32::fits(t) && t.shape().num_elements() == n;
        let fused = fits(&tensor)
            && state.as_ref().is_none_or(|s| {
                s.momentum.max_moment_2.is_none()
                    && fits(&s.momentum.moment_1)
                    && fits(&s.momentum.moment_2)
            });
        if !fused {
            return Err(Box::new((tensor, state)));
        }
        let owned =
            |t: Tensor<D>| OwnedF32::of(t).unwrap_or_else(|_| unreachable!("checked above"));
        let shape = tensor.dims();
        let mut p = owned(tensor);
        let (t, first, mut m, mut v) = match state {
            Some(s) => (
                s.momentum.time + 1,
                false,
                owned(s.momentum.moment_1),
                owned(s.momentum.moment_2),
            ),
            None => {
                let zeros = || owned(flex_f32(vec![0.0; n], shape));
                (1, true, zeros(), zeros())
            }
        };
        let ti = t as i32;
        let step = AdamWStep {
            lr: lr as f32,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            decay: (1.0 - lr * f64::from(self.weight_decay)) as f32,
            c1: 1.0 - self.beta1.powi(ti),
            c2: 1.0 - self.beta2.powi(ti),
        };
        adamw_step(
            &step,
            first,
            g.values(),
            p.values_mut(),
            m.values_mut(),
            v.values_mut(),
        );
        let momentum = AdaptiveMomentumState {
            time: t,
            moment_1: m.into_tensor(),
            moment_2: v.into_tensor(),
            max_moment_2: None,
        };
        Ok((p.into_tensor(), AdamWState { momentum }))
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
        match self.fused(lr, tensor, &grad, state) {
            Ok((t, s)) => (t, Some(s)),
            Err(back) => {
                let (tensor, state) = *back;
                self.burn.step(lr, tensor, grad, state)
            }
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
            let (shared, before) = (a.clone(), vec(&a));
            assert!(
                ours.fused(lr, a.clone(), &t(&g), sa.clone()).is_ok(),
                "flex takes the fused step"
            );
            assert_eq!(vec(&shared), before, "a parameter held elsewhere stays");
            drop(shared);
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

    #[test]
    fn a_strided_parameter_takes_burns_step() {
        let ours = FusedAdamW::new(0.9, 0.95, 1e-8, 0.1);
        let p: Vec<f32> = (0..60).map(|i| i as f32 / 10.0).collect();
        let p = Tensor::<2>::from_data(TensorData::new(p, [6, 10]), &Device::default()).transpose();
        let g = p.clone().mul_scalar(0.5);
        let (a, _) = ours.step(0.01, p.clone(), g.clone(), None);
        let (b, _) = ours.burn.step(0.01, p, g, None);
        let flat = |t: Tensor<2>| t.into_data().iter::<f32>().collect::<Vec<_>>();
        assert_eq!(flat(a), flat(b));
    }
}
