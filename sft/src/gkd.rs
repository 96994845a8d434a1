//! On-policy distillation (GKD, Agarwal et al., arXiv 2306.13649): the loss
//! on a sequence the student sampled itself is the per-token generalized
//! Jensen-Shannon divergence between teacher `P` and student `Q` (both at
//! temperature τ):
//!
//! `M = β·P + (1 − β)·Q`,
//! `JSD_β(P ‖ Q) = β·KL(P ‖ M) + (1 − β)·KL(Q ‖ M)`,
//!
//! with the endpoints defined as the limits' directions: β = 0 is the forward
//! KL `KL(P ‖ Q)`, β = 1 the reverse KL `KL(Q ‖ P)` (as in the paper and TRL).

use burn::tensor::Tensor;
use burn::tensor::activation::log_softmax;

use crate::distill::forward_kl;

/// `JSD_β(p_T^τ ‖ p_S^τ)` per position, `[batch, len]`.
pub fn generalized_jsd(
    student_logits: Tensor<3>,
    teacher_logits: Tensor<3>,
    beta: f64,
    tau: f64,
) -> Tensor<2> {
    if beta <= 0.0 {
        return forward_kl(student_logits, teacher_logits, tau);
    }
    if beta >= 1.0 {
        return forward_kl(teacher_logits, student_logits, tau);
    }
    let [b, t, _] = student_logits.dims();
    let log_q = log_softmax(student_logits.div_scalar(tau), 2);
    let log_p = log_softmax(teacher_logits.div_scalar(tau), 2);
    let a = log_p.clone().add_scalar(beta.ln());
    let c = log_q.clone().add_scalar((1.0 - beta).ln());
    let top = a.clone().max_pair(c.clone());
    let log_m = top.clone() + ((a - top.clone()).exp() + (c - top).exp()).log();
    let kl_p = (log_p.clone().exp() * (log_p - log_m.clone())).sum_dim(2);
    let kl_q = (log_q.clone().exp() * (log_q - log_m)).sum_dim(2);
    (kl_p.mul_scalar(beta) + kl_q.mul_scalar(1.0 - beta)).reshape([b, t])
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    const S: [f32; 3] = [0.0, 0.5, -1.0];
    const T: [f32; 3] = [1.0, -0.5, 0.25];

    fn probs(z: [f32; 3]) -> [f64; 3] {
        let e = z.map(|v| f64::from(v).exp());
        let sum: f64 = e.iter().sum();
        e.map(|v| v / sum)
    }

    fn kl(p: [f64; 3], q: [f64; 3]) -> f64 {
        (0..3).map(|i| p[i] * (p[i] / q[i]).ln()).sum()
    }

    /// JSD_β by hand from the probabilities.
    fn by_hand(s: [f32; 3], t: [f32; 3], beta: f64) -> f64 {
        let (q, p) = (probs(s), probs(t));
        match beta {
            0.0 => kl(p, q),
            1.0 => kl(q, p),
            _ => {
                let m = [0, 1, 2].map(|i| beta * p[i] + (1.0 - beta) * q[i]);
                beta * kl(p, m) + (1.0 - beta) * kl(q, m)
            }
        }
    }

    fn jsd(s: [f32; 3], beta: f64, device: &Device) -> Tensor<1> {
        let s = Tensor::<3>::from_data(TensorData::new(s.to_vec(), [1, 1, 3]), device);
        let t = Tensor::<3>::from_data(TensorData::new(T.to_vec(), [1, 1, 3]), device);
        generalized_jsd(s, t, beta, 1.0).sum()
    }

    #[test]
    fn values_by_hand() {
        for beta in [0.0, 0.1, 0.5, 0.9, 1.0] {
            let got = f64::from(jsd(S, beta, &Device::default()).into_scalar::<f32>());
            let want = by_hand(S, T, beta);
            assert!((got - want).abs() < 1e-6, "β {beta}: {got} vs {want}");
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let device = Device::default().autodiff();
        for beta in [0.0, 0.5, 1.0] {
            let s = Tensor::<3>::from_data(TensorData::new(S.to_vec(), [1, 1, 3]), &device)
                .require_grad();
            let t = Tensor::<3>::from_data(TensorData::new(T.to_vec(), [1, 1, 3]), &device);
            let grads = generalized_jsd(s.clone(), t, beta, 1.0).sum().backward();
            let g = s
                .grad(&grads)
                .unwrap()
                .into_data()
                .try_into_vec::<f32>()
                .unwrap();
            for i in 0..3 {
                let h = 1e-3;
                let (mut up, mut down) = (S, S);
                up[i] += h;
                down[i] -= h;
                let fd = (by_hand(up, T, beta) - by_hand(down, T, beta)) / (2.0 * f64::from(h));
                assert!(
                    (f64::from(g[i]) - fd).abs() < 1e-4,
                    "β {beta} [{i}]: {} vs {fd}",
                    g[i]
                );
            }
            if beta == 0.0 {
                // forward KL: q − p
                let (q, p) = (probs(S), probs(T));
                for i in 0..3 {
                    assert!((f64::from(g[i]) - (q[i] - p[i])).abs() < 1e-6);
                }
            }
        }
    }

    #[test]
    fn identical_teacher_and_student_give_zero() {
        let d = Device::default();
        for beta in [0.0, 0.5, 1.0] {
            let t = Tensor::<3>::from_data(TensorData::new(T.to_vec(), [1, 1, 3]), &d);
            let v = generalized_jsd(t.clone(), t, beta, 2.0)
                .sum()
                .into_scalar::<f32>();
            assert!(v.abs() < 1e-7, "β {beta}: {v}");
        }
    }
}
