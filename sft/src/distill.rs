//! Word-level knowledge distillation from the full teacher distribution
//! (Hinton et al.; Gemma 2 pre-training and SFT, teacher computed in the
//! step). Per target token, with teacher `p_T` and student `p_S` at
//! temperature τ:
//!
//! `L = (1 − α)·CE(y) + α·τ²·KL(p_T^τ ‖ p_S^τ)`,
//! `KL(p ‖ q) = Σ_x p(x)(log p(x) − log q(x))`,
//!
//! averaged over the target tokens. Its gradient in the student's logits is
//! `α·τ·(q − p)`: the same as the seed's `Σ_x −p_T(x) log p_S(x)`, which
//! differs from KL by the teacher's entropy.

use burn::tensor::Tensor;
use burn::tensor::activation::{log_softmax, softmax};

/// `KL(p_T^τ ‖ p_S^τ)` per position, `[batch, len]`.
pub fn forward_kl(student_logits: Tensor<3>, teacher_logits: Tensor<3>, tau: f64) -> Tensor<2> {
    let [b, t, _] = student_logits.dims();
    let log_q = log_softmax(student_logits.div_scalar(tau), 2);
    let teacher = teacher_logits.div_scalar(tau);
    let log_p = log_softmax(teacher.clone(), 2);
    let p = softmax(teacher, 2);
    (p * (log_p - log_q)).sum_dim(2).reshape([b, t])
}

/// `(1 − α)·ce + α·τ²·kl`; with α = 0 exactly `ce`.
pub fn mix(ce: Tensor<1>, kl: Tensor<1>, alpha: f64, tau: f64) -> Tensor<1> {
    if alpha == 0.0 {
        return ce;
    }
    ce.mul_scalar(1.0 - alpha) + kl.mul_scalar(alpha * tau * tau)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    fn logits(v: Vec<f32>, t: usize) -> Tensor<3> {
        let n = v.len() / t;
        Tensor::from_data(TensorData::new(v, [1, t, n]), &Device::default())
    }

    #[test]
    fn kl_on_three_tokens_by_hand() {
        // teacher p = softmax(0, ln 2, ln 3) = (1/6, 2/6, 3/6); student uniform
        let teacher = logits(vec![0.0, 2f32.ln(), 3f32.ln()], 1);
        let student = logits(vec![0.0, 0.0, 0.0], 1);
        let kl = forward_kl(student, teacher, 1.0)
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        let p = [1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0f32];
        let want: f32 = p.iter().map(|p| p * (p.ln() - (1.0f32 / 3.0).ln())).sum();
        assert!((kl[0] - want).abs() < 1e-6, "{} vs {want}", kl[0]);
    }

    #[test]
    fn kl_gradient_is_student_minus_teacher_probabilities() {
        // d KL / d student_logits = (q − p) / τ
        let device = Device::default().autodiff();
        let s =
            Tensor::<3>::from_data(TensorData::new(vec![0.5f32, -1.0, 2.0], [1, 1, 3]), &device)
                .require_grad();
        let t =
            Tensor::<3>::from_data(TensorData::new(vec![1.0f32, 0.0, -1.0], [1, 1, 3]), &device);
        let tau = 2.0;
        let kl = forward_kl(s.clone(), t, tau).sum();
        let grads = kl.backward();
        let g = s
            .grad(&grads)
            .unwrap()
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        let soft = |x: [f32; 3]| {
            let e: Vec<f32> = x.iter().map(|v| (v / tau as f32).exp()).collect();
            let z: f32 = e.iter().sum();
            e.into_iter().map(|v| v / z).collect::<Vec<_>>()
        };
        let (q, p) = (soft([0.5, -1.0, 2.0]), soft([1.0, 0.0, -1.0]));
        for i in 0..3 {
            let want = (q[i] - p[i]) / tau as f32;
            assert!((g[i] - want).abs() < 1e-6, "{i}: {} vs {want}", g[i]);
        }
    }

    #[test]
    fn identical_distributions_give_zero_kl_and_alpha_zero_is_ce() {
        let l = logits(vec![0.3, -0.2, 1.0, 0.1, 0.4, -0.5], 2);
        let kl = forward_kl(l.clone(), l, 2.0)
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        assert!(kl.iter().all(|k| k.abs() < 1e-7), "{kl:?}");
        let d = Device::default();
        let ce = Tensor::<1>::from_data(TensorData::new(vec![0.8f32], [1]), &d);
        let kl = Tensor::<1>::from_data(TensorData::new(vec![0.3f32], [1]), &d);
        assert_eq!(
            mix(ce.clone(), kl.clone(), 0.0, 2.0).into_scalar::<f32>(),
            0.8
        );
        let half = mix(ce, kl, 0.5, 2.0).into_scalar::<f32>();
        assert!((half - (0.4 + 0.5 * 4.0 * 0.3)).abs() < 1e-6);
    }
}
