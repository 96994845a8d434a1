//! Word-level knowledge distillation (Hinton et al.; Gemma 2 pre-training and
//! SFT). Per target token, with teacher `p_T` and student `p_S` at
//! temperature τ:
//!
//! `L = (1 − α)·CE(y) + α·τ²·KL(p_T^τ ‖ p_S^τ)`,
//! `KL(p ‖ q) = Σ_x p(x)(log p(x) − log q(x))`,
//!
//! averaged over the target tokens. Its gradient equals that of the
//! seed's `Σ_x −p_T(x) log p_S(x)` (they differ by the teacher's entropy).

use burn::tensor::Tensor;
use burn::tensor::activation::{log_softmax, softmax};
use posttrain_model::TokenBatch;
use posttrain_model::gemma2::next_token_logprobs;

/// `KL(p_T^τ ‖ p_S^τ)` per position, `[batch, len]`.
pub fn forward_kl(student_logits: Tensor<3>, teacher_logits: Tensor<3>, tau: f64) -> Tensor<2> {
    let [b, t, _] = student_logits.dims();
    let log_q = log_softmax(student_logits.div_scalar(tau), 2);
    let teacher = teacher_logits.div_scalar(tau);
    let log_p = log_softmax(teacher.clone(), 2);
    let p = softmax(teacher, 2);
    (p * (log_p - log_q)).sum_dim(2).reshape([b, t])
}

/// Loss parts, each averaged over the weighted target tokens.
pub struct DistillLoss {
    pub loss: Tensor<1>,
    pub ce: Tensor<1>,
    pub kl: Option<Tensor<1>>,
}

/// `weights` is `[batch, len − 1]`: 1 where the next token is a target.
/// Without a teacher (or α = 0) this is exactly the cross-entropy.
pub fn distillation_loss(
    student_logits: Tensor<3>,
    teacher_logits: Option<Tensor<3>>,
    batch: &TokenBatch,
    weights: Tensor<2>,
    alpha: f64,
    tau: f64,
) -> DistillLoss {
    let [_, t, _] = student_logits.dims();
    let count = weights.clone().sum();
    let logp = next_token_logprobs(student_logits.clone(), batch);
    let ce = (logp * weights.clone()).sum().neg().div(count.clone());
    let Some(teacher) = teacher_logits.filter(|_| alpha > 0.0) else {
        return DistillLoss {
            loss: ce.clone(),
            ce,
            kl: None,
        };
    };
    let kl = forward_kl(
        student_logits.narrow(1, 0, t - 1),
        teacher.narrow(1, 0, t - 1),
        tau,
    );
    let kl = (kl * weights).sum().div(count);
    let loss = ce.clone().mul_scalar(1.0 - alpha) + kl.clone().mul_scalar(alpha * tau * tau);
    DistillLoss {
        loss,
        ce,
        kl: Some(kl),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    fn logits(v: Vec<f32>, t: usize) -> Tensor<3> {
        let n = v.len() / t;
        Tensor::from_data(TensorData::new(v, [1, t, n]), &Device::default())
    }

    fn scalar(t: Tensor<1>) -> f32 {
        t.into_scalar::<f32>()
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
        let batch = TokenBatch::dense(vec![0, 2, 1], 1, 3);
        let l = logits(vec![0.3, -0.2, 1.0, 0.1, 0.4, -0.5, 0.0, 0.0, 0.0], 3);
        let w = Tensor::<2>::from_data(
            TensorData::new(vec![1.0f32, 1.0], [1, 2]),
            &Device::default(),
        );
        let same = distillation_loss(l.clone(), Some(l.clone()), &batch, w.clone(), 0.5, 2.0);
        assert!(scalar(same.kl.unwrap()).abs() < 1e-7);
        let ce_only = distillation_loss(
            l.clone(),
            Some(l.clone() * 3.0),
            &batch,
            w.clone(),
            0.0,
            1.0,
        );
        let plain = distillation_loss(l, None, &batch, w, 0.7, 1.0);
        assert_eq!(scalar(ce_only.loss), scalar(plain.ce));
        // CE by hand: targets 2 then 1
        let lse = |v: [f32; 3]| v.iter().map(|x| x.exp()).sum::<f32>().ln();
        let want = ((lse([0.3, -0.2, 1.0]) - 1.0) + (lse([0.1, 0.4, -0.5]) - 0.4)) / 2.0;
        assert!((scalar(plain.loss) - want).abs() < 1e-6);
    }
}
