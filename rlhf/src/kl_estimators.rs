//! Per-token estimators of KL(π_θ ‖ π_ref) from tokens sampled from π_θ,
//! with `ρ_t = π_ref(y_t|·) / π_θ(y_t|·)` (Schulman, "Approximating KL
//! divergence", 2020):
//!
//! k1 `= −log ρ_t` — unbiased; its sequence sum is the KL term WARP puts in
//! the shaped reward;
//! k3 `= ρ_t − 1 − log ρ_t` — unbiased too (E_θ[ρ] = 1), never negative, with
//! less variance; GRPO adds it to the loss, where its gradient is not that of
//! the KL (the reason the placement is an explicit choice).

use burn::tensor::Tensor;

/// Which estimator a KL term uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    K1,
    K3,
}

/// Where the KL term enters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KlIn {
    /// Subtracted from the reward, β·Σ_t k_t, a constant for the gradient.
    Reward,
    /// Added to the loss, β·mean_i Σ_t k_t, differentiated through π_θ.
    Loss,
}

impl KlEstimator {
    /// The estimate at one token from its log-probabilities under the
    /// policy and the reference.
    pub fn at(self, logp: f64, logp_ref: f64) -> f64 {
        let log_ratio = logp_ref - logp;
        match self {
            KlEstimator::K1 => -log_ratio,
            KlEstimator::K3 => log_ratio.exp() - 1.0 - log_ratio,
        }
    }

    /// The same on tensors (`logp` carries the gradient; `logp_ref` is a
    /// constant), element by element.
    pub fn on(self, logp: Tensor<2>, logp_ref: Tensor<2>) -> Tensor<2> {
        let log_ratio = logp_ref - logp;
        match self {
            KlEstimator::K1 => log_ratio.neg(),
            KlEstimator::K3 => log_ratio.clone().exp().sub_scalar(1.0).sub(log_ratio),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    #[test]
    fn by_hand() {
        // logp = ln 0.5, logp_ref = ln 0.25: ρ = 0.5
        let (p, q) = (0.5f64.ln(), 0.25f64.ln());
        assert!((KlEstimator::K1.at(p, q) - 2f64.ln()).abs() < 1e-12);
        assert!((KlEstimator::K3.at(p, q) - (0.5 - 1.0 + 2f64.ln())).abs() < 1e-12);
        // equal distributions: both 0
        assert_eq!(KlEstimator::K1.at(p, p), 0.0);
        assert_eq!(KlEstimator::K3.at(p, p), 0.0);
    }

    #[test]
    fn both_are_unbiased_estimates_of_the_kl() {
        let p = [0.5f64, 0.3, 0.15, 0.05];
        let q = [0.25f64; 4];
        let kl: f64 = p.iter().zip(&q).map(|(a, b)| a * (a / b).ln()).sum();
        // expectations over y ~ p, exactly
        let expect = |e: KlEstimator| -> f64 {
            p.iter()
                .zip(&q)
                .map(|(a, b)| a * e.at(a.ln(), b.ln()))
                .sum()
        };
        assert!((expect(KlEstimator::K1) - kl).abs() < 1e-12);
        assert!((expect(KlEstimator::K3) - kl).abs() < 1e-12);
        // and by sampling: a seeded draw of 200k tokens from p
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let (mut s1, mut s3, n) = (0.0, 0.0, 200_000);
        for _ in 0..n {
            let u: f64 = rng.random();
            let mut acc = 0.0;
            let y = p.iter().position(|a| {
                acc += a;
                u < acc
            });
            let y = y.unwrap_or(p.len() - 1);
            s1 += KlEstimator::K1.at(p[y].ln(), q[y].ln());
            s3 += KlEstimator::K3.at(p[y].ln(), q[y].ln());
        }
        assert!((s1 / n as f64 - kl).abs() < 0.01, "k1 {}", s1 / n as f64);
        assert!((s3 / n as f64 - kl).abs() < 0.01, "k3 {}", s3 / n as f64);
    }

    #[test]
    fn tensor_values_and_k3_gradient() {
        let device = Device::default().autodiff();
        let logp = Tensor::<2>::from_data(
            TensorData::new(vec![0.5f32.ln(), 0.2f32.ln()], [1, 2]),
            &device,
        )
        .require_grad();
        let logp_ref = Tensor::<2>::from_data(
            TensorData::new(vec![0.25f32.ln(), 0.2f32.ln()], [1, 2]),
            &device,
        );
        let k3 = KlEstimator::K3.on(logp.clone(), logp_ref);
        let v = k3.clone().into_data().try_into_vec_as::<f64>().unwrap();
        assert!(
            (v[0] - (0.5 - 1.0 + 2f64.ln())).abs() < 1e-6 && v[1].abs() < 1e-7,
            "{v:?}"
        );
        // ∂k3/∂logp = 1 − ρ: 0.5 at the first token, 0 where the two agree
        let g = logp
            .grad(&k3.sum().backward())
            .unwrap()
            .into_data()
            .try_into_vec_as::<f64>()
            .unwrap();
        assert!((g[0] - 0.5).abs() < 1e-6 && g[1].abs() < 1e-6, "{g:?}");
    }
}
