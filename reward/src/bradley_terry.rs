//! Bradley-Terry preference loss (the InstructGPT / Gemma reward model
//! objective), with an optional margin `m`:
//!
//! `L = −log σ(r⁺ − r⁻ − m) = softplus(−(r⁺ − r⁻ − m))`, averaged over pairs,
//!
//! so `∂L/∂r⁺ = −σ(−(r⁺ − r⁻ − m))` and `∂L/∂r⁻ = +σ(−(r⁺ − r⁻ − m))`.

use burn::tensor::Tensor;
use burn::tensor::activation::log_sigmoid;

/// Mean loss over pairs; `chosen`, `rejected` `[pairs]`.
pub fn bradley_terry_loss(chosen: Tensor<1>, rejected: Tensor<1>, margin: f64) -> Tensor<1> {
    log_sigmoid((chosen - rejected).sub_scalar(margin))
        .mean()
        .neg()
}

/// Pairwise accuracy and reward-gap statistics of scored pairs.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PairStats {
    pub pairs: usize,
    /// Fraction with `r⁺ > r⁻` (ties count half).
    pub accuracy: f64,
    pub loss: f64,
    pub mean_gap: f64,
    pub std_gap: f64,
    pub mean_chosen: f64,
    pub mean_rejected: f64,
}

impl PairStats {
    pub fn new(chosen: &[f32], rejected: &[f32], margin: f64) -> Self {
        let n = chosen.len().max(1) as f64;
        let gaps: Vec<f64> = chosen
            .iter()
            .zip(rejected)
            .map(|(c, r)| f64::from(*c) - f64::from(*r))
            .collect();
        let right: f64 = gaps
            .iter()
            .map(|&g| match g.partial_cmp(&0.0) {
                Some(std::cmp::Ordering::Greater) => 1.0,
                Some(std::cmp::Ordering::Equal) => 0.5,
                _ => 0.0,
            })
            .sum();
        let softplus = |x: f64| x.max(0.0) + (-x.abs()).exp().ln_1p();
        let loss = gaps.iter().map(|g| softplus(-(g - margin))).sum::<f64>() / n;
        let mean_gap = gaps.iter().sum::<f64>() / n;
        let var = gaps.iter().map(|g| (g - mean_gap).powi(2)).sum::<f64>() / n;
        let mean = |v: &[f32]| v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        Self {
            pairs: chosen.len(),
            accuracy: right / n,
            loss,
            mean_gap,
            std_gap: var.sqrt(),
            mean_chosen: mean(chosen),
            mean_rejected: mean(rejected),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    fn t(v: &[f32], d: &Device) -> Tensor<1> {
        Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), d)
    }

    #[test]
    fn loss_and_gradient_by_hand() {
        let d = Device::default().autodiff();
        let c = t(&[2.0, 0.0, -30.0], &d).require_grad();
        let r = t(&[1.0, 0.0, 10.0], &d).require_grad();
        let loss = bradley_terry_loss(c.clone(), r.clone(), 0.0);
        // gaps 1, 0, −40: softplus(−1) = ln(1 + e^−1), ln 2, ≈ 40
        let want =
            ((1.0 + (-1.0f64).exp()).ln() + 2f64.ln() + 40.0 + (-40.0f64).exp().ln_1p()) / 3.0;
        let got = f64::from(loss.clone().into_scalar::<f32>());
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        let grads = loss.backward();
        let gc = c
            .grad(&grads)
            .unwrap()
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        let gr = r
            .grad(&grads)
            .unwrap()
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        for (i, gap) in [1.0, 0.0, -40.0].into_iter().enumerate() {
            let want = -sig(-gap) / 3.0;
            assert!(
                (f64::from(gc[i]) - want).abs() < 1e-6,
                "{i}: {} vs {want}",
                gc[i]
            );
            assert!((f64::from(gr[i]) + want).abs() < 1e-6);
        }
    }

    #[test]
    fn margin_shifts_the_gap() {
        let d = Device::default();
        let with = bradley_terry_loss(t(&[3.0], &d), t(&[1.0], &d), 1.5).into_scalar::<f32>();
        let plain = bradley_terry_loss(t(&[1.5], &d), t(&[1.0], &d), 0.0).into_scalar::<f32>();
        assert!((with - plain).abs() < 1e-6);
    }

    #[test]
    fn stats_by_hand() {
        let s = PairStats::new(&[1.0, 0.5, 2.0, 0.0], &[0.0, 0.5, 3.0, -1.0], 0.0);
        assert_eq!(s.pairs, 4);
        assert!((s.accuracy - 2.5 / 4.0).abs() < 1e-12);
        assert!((s.mean_gap - 0.25).abs() < 1e-12);
        let var = (0.75f64.powi(2) + 0.25f64.powi(2) + 1.25f64.powi(2) + 0.75f64.powi(2)) / 4.0;
        assert!((s.std_gap - var.sqrt()).abs() < 1e-12);
    }
}
