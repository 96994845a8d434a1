//! Direct preference optimisation (DPO, arXiv 2305.18290) and its identity
//! variant (IPO, arXiv 2310.12036). With completion log-prob sums `s` under
//! the policy and `s_ref` under a frozen reference, per pair
//!
//! `h = β·[(s⁺ − s⁺_ref) − (s⁻ − s⁻_ref)]` (the margin of implicit rewards
//! `β·(s − s_ref)`),
//!
//! sigmoid loss `−(1 − ε)·log σ(h) − ε·log σ(−h)` (ε: label smoothing, 0 by
//! default), IPO loss `(h/β − 1/(2β))²`; the loss is the mean over pairs.

use burn::tensor::Tensor;
use burn::tensor::activation::log_sigmoid;

/// Which preference loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpoLoss {
    Sigmoid,
    Ipo,
}

/// The margins `h` `[n]` of the implicit rewards (no reduction).
pub fn margins(
    chosen: Tensor<1>,
    rejected: Tensor<1>,
    ref_chosen: Tensor<1>,
    ref_rejected: Tensor<1>,
    beta: f64,
) -> Tensor<1> {
    (chosen - ref_chosen)
        .sub(rejected - ref_rejected)
        .mul_scalar(beta)
}

/// The mean loss over pairs from their margins `h`.
pub fn preference_loss(h: Tensor<1>, kind: DpoLoss, beta: f64, label_smoothing: f64) -> Tensor<1> {
    match kind {
        DpoLoss::Sigmoid => {
            let eps = label_smoothing;
            let lose = log_sigmoid(h.clone().neg()).mul_scalar(eps);
            log_sigmoid(h).mul_scalar(1.0 - eps).add(lose).neg().mean()
        }
        DpoLoss::Ipo => h
            .div_scalar(beta)
            .sub_scalar(1.0 / (2.0 * beta))
            .square()
            .mean(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    fn t(v: &[f32], device: &Device) -> Tensor<1> {
        Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), device)
    }

    fn vec(x: Tensor<1>) -> Vec<f64> {
        x.into_data().try_into_vec_as::<f64>().unwrap()
    }

    /// Loss and ∂loss/∂s⁺, ∂loss/∂s⁻ for one pair: s⁺ = −2, s⁻ = −3 against
    /// a reference that gives both −2.5, so h = β·(0.5 + 0.5) = β.
    fn one_pair(kind: DpoLoss, beta: f64, eps: f64) -> (f64, f64, f64) {
        let device = Device::default().autodiff();
        let (c, r) = (
            t(&[-2.0], &device).require_grad(),
            t(&[-3.0], &device).require_grad(),
        );
        let h = margins(
            c.clone(),
            r.clone(),
            t(&[-2.5], &device),
            t(&[-2.5], &device),
            beta,
        );
        let loss = preference_loss(h, kind, beta, eps);
        let value = loss.clone().into_scalar::<f64>();
        let grads = loss.backward();
        let g = |x: &Tensor<1>| vec(x.grad(&grads).unwrap())[0];
        (value, g(&c), g(&r))
    }

    fn sigmoid(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    #[test]
    fn sigmoid_loss_and_gradient_by_hand() {
        // h = 0.1: −log σ(0.1) = ln(1 + e^−0.1); ∂/∂s⁺ = −β·σ(−h), ∂/∂s⁻ = +β·σ(−h)
        let (v, gc, gr) = one_pair(DpoLoss::Sigmoid, 0.1, 0.0);
        assert!((v - (1.0 + (-0.1f64).exp()).ln()).abs() < 1e-6, "{v}");
        assert!((gc + 0.1 * sigmoid(-0.1)).abs() < 1e-6, "{gc}");
        assert!((gr - 0.1 * sigmoid(-0.1)).abs() < 1e-6, "{gr}");
    }

    #[test]
    fn label_smoothing_by_hand() {
        // −0.9·log σ(0.1) − 0.1·log σ(−0.1)
        let (v, gc, _) = one_pair(DpoLoss::Sigmoid, 0.1, 0.1);
        let want = -0.9 * sigmoid(0.1).ln() - 0.1 * sigmoid(-0.1).ln();
        assert!((v - want).abs() < 1e-6, "{v} vs {want}");
        // ∂/∂h = −0.9·σ(−h) + 0.1·σ(h), times β
        let dh = -0.9 * sigmoid(-0.1) + 0.1 * sigmoid(0.1);
        assert!((gc - 0.1 * dh).abs() < 1e-6, "{gc}");
    }

    #[test]
    fn ipo_loss_and_gradient_by_hand() {
        // h/β = 1, 1/(2β) = 5: (1 − 5)² = 16; ∂/∂s⁺ = 2·(1 − 5) = −8, ∂/∂s⁻ = 8
        let (v, gc, gr) = one_pair(DpoLoss::Ipo, 0.1, 0.0);
        assert!((v - 16.0).abs() < 1e-4, "{v}");
        assert!(
            (gc + 8.0).abs() < 1e-4 && (gr - 8.0).abs() < 1e-4,
            "{gc} {gr}"
        );
    }

    #[test]
    fn a_policy_equal_to_the_reference_has_zero_margin_and_loss_ln_2() {
        let device = Device::default();
        let s = t(&[-4.0, -1.5, -7.25], &device);
        let r = t(&[-3.0, -2.0, -1.0], &device);
        let h = margins(s.clone(), r.clone(), s, r, 0.1);
        assert_eq!(vec(h.clone()), [0.0; 3]);
        let v = preference_loss(h, DpoLoss::Sigmoid, 0.1, 0.0).into_scalar::<f64>();
        assert!((v - 2f64.ln()).abs() < 1e-6, "{v}");
    }
}
