//! Offline distillation from stored teacher top-k (the `generate` stage's
//! `teacher_topk_*` columns): the teacher distribution is known only on its
//! k most likely tokens `K_t` at each position.
//!
//! Renormalised top-k: `p(i) = softmax_{j∈K}(log p_T(j)/τ)(i)`,
//! `q(i) = softmax_{j∈K}(z_j/τ)(i)` for `i ∈ K`, and
//! `KL_K = Σ_{i∈K} p(i)(log p(i) − log q(i))`.
//!
//! With the rest-of-mass bucket the teacher is `(p_T(K), 1 − Σ_K p_T)`
//! tempered as k + 1 outcomes, the student is `softmax(z/τ)` on `K` plus
//! `1 − Σ_K q` for every other token, and KL runs over those k + 1 buckets.
//! Either way it enters `(1 − α)·CE + α·τ²·KL` like the full-vocabulary KL.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor};

/// Smallest probability a bucket is given, so that its log stays finite.
const FLOOR: f64 = 1e-12;

/// Per-position KL `[batch, positions]`. `student_logits` `[b, positions, V]`
/// are the logits that predict each target; `ids` / `logprobs`
/// `[b, positions, k]` the stored teacher top-k at the same positions
/// (positions without a target may hold anything finite).
pub fn topk_kl(
    student_logits: Tensor<3>,
    ids: Tensor<3, Int>,
    logprobs: Tensor<3>,
    tau: f64,
    rest: bool,
) -> Tensor<2> {
    let [b, t, _] = student_logits.dims();
    let (log_p, log_q) = if rest {
        let mass = logprobs.clone().exp().sum_dim(2);
        let rest_p = mass.neg().add_scalar(1.0).clamp_min(FLOOR).log();
        let log_p = log_softmax(Tensor::cat(vec![logprobs, rest_p], 2).div_scalar(tau), 2);
        let log_q_all = log_softmax(student_logits.div_scalar(tau), 2);
        let log_q_k = log_q_all.gather(2, ids);
        let rest_q = log_q_k
            .clone()
            .exp()
            .sum_dim(2)
            .neg()
            .add_scalar(1.0)
            .clamp_min(FLOOR)
            .log();
        (log_p, Tensor::cat(vec![log_q_k, rest_q], 2))
    } else {
        let log_p = log_softmax(logprobs.div_scalar(tau), 2);
        let log_q = log_softmax(student_logits.gather(2, ids).div_scalar(tau), 2);
        (log_p, log_q)
    };
    (log_p.clone().exp() * (log_p - log_q))
        .sum_dim(2)
        .reshape([b, t])
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    /// Student q = (1/6, 2/6, 3/6); teacher top-2 = tokens 2 and 0 with
    /// probabilities 0.5 and 0.3 (rest 0.2).
    fn case(device: &Device) -> (Tensor<3>, Tensor<3, Int>, Tensor<3>) {
        let z = vec![0.0f32, 2f32.ln(), 3f32.ln()];
        let s = Tensor::<3>::from_data(TensorData::new(z, [1, 1, 3]), device).require_grad();
        let ids = Tensor::<3, Int>::from_data(TensorData::new(vec![2i64, 0], [1, 1, 2]), device);
        let lp = vec![0.5f32.ln(), 0.3f32.ln()];
        let lp = Tensor::<3>::from_data(TensorData::new(lp, [1, 1, 2]), device);
        (s, ids, lp)
    }

    fn run(rest: bool) -> (f32, Vec<f32>) {
        let device = Device::default().autodiff();
        let (s, ids, lp) = case(&device);
        let kl = topk_kl(s.clone(), ids, lp, 1.0, rest).sum();
        let grads = kl.backward();
        let g = s
            .grad(&grads)
            .unwrap()
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        (kl.into_scalar::<f32>(), g)
    }

    fn close(a: f32, b: f32) {
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }

    #[test]
    fn renormalised_top_k_by_hand() {
        // p = (0.625, 0.375) on (2, 0); q = (0.75, 0.25)
        let (kl, g) = run(false);
        close(
            kl,
            0.625 * (0.625f32 / 0.75).ln() + 0.375 * (0.375f32 / 0.25).ln(),
        );
        // d/dz = q − p on K, 0 elsewhere
        close(g[2], 0.75 - 0.625);
        close(g[0], 0.25 - 0.375);
        close(g[1], 0.0);
    }

    #[test]
    fn rest_bucket_by_hand() {
        // buckets (2, 0, rest): p = (0.5, 0.3, 0.2), q = (0.5, 1/6, 1/3)
        let (kl, g) = run(true);
        close(kl, 0.3 * (0.3f32 * 6.0).ln() + 0.2 * (0.2f32 * 3.0).ln());
        // on K: q − p; outside: q_j − p_rest · q_j / q_rest
        close(g[2], 0.0);
        close(g[0], 1.0 / 6.0 - 0.3);
        close(g[1], 1.0 / 3.0 - 0.2);
    }

    #[test]
    fn teacher_equal_to_student_gives_zero() {
        let device = Device::default().autodiff();
        let (s, ids, _) = case(&device);
        let lp = vec![0.5f32.ln(), (1.0f32 / 6.0).ln()];
        let lp = Tensor::<3>::from_data(TensorData::new(lp, [1, 1, 2]), &device);
        for rest in [false, true] {
            let kl = topk_kl(s.clone(), ids.clone(), lp.clone(), 1.5, rest);
            assert!(kl.into_scalar::<f32>().abs() < 1e-6);
        }
    }
}
