//! REINFORCE with a leave-one-out baseline (RLOO) on a KL-shaped reward, as
//! WARP's stage 1 uses it. For prompt x and its K samples y_1..y_K:
//!
//! `r_β(x, y) = r(x, y) − β·Σ_t [log π_θ(y_t|·) − log π_anchor(y_t|·)]`
//! `A_i = r_β,i − 1/(K−1)·Σ_{j≠i} r_β,j`
//! `L = −1/N·Σ_i A_i·Σ_t log π_θ(y_{i,t}|·)`
//!
//! The advantages of one prompt's samples sum to zero, so the baseline
//! needs no value network.

use burn::tensor::{Tensor, TensorData};

/// `r − β·kl − length_penalty·length`.
pub fn shaped_reward(reward: f64, kl: f64, beta: f64, length_penalty: f64, length: usize) -> f64 {
    reward - beta * kl - length_penalty * length as f64
}

/// Leave-one-out advantages of consecutive groups of `k` samples.
///
/// # Panics
/// When `k < 2` or `rewards.len()` is not a multiple of `k`.
pub fn rloo_advantages(rewards: &[f64], k: usize) -> Vec<f64> {
    assert!(
        k >= 2,
        "a leave-one-out baseline needs at least 2 samples per prompt"
    );
    assert_eq!(rewards.len() % k, 0, "rewards come in groups of {k}");
    rewards
        .chunks(k)
        .flat_map(|group| {
            let sum: f64 = group.iter().sum();
            group.iter().map(move |r| r - (sum - r) / (k - 1) as f64)
        })
        .collect()
}

/// `−mean_i A_i·s_i` for per-sequence log-probability sums `s` `[n]`; the
/// advantages are constants.
pub fn policy_gradient_loss(sequence_logprobs: Tensor<1>, advantages: &[f64]) -> Tensor<1> {
    let n = advantages.len();
    let a: Vec<f32> = advantages.iter().map(|&a| a as f32).collect();
    let a = Tensor::<1>::from_data(TensorData::new(a, [n]), &sequence_logprobs.device());
    sequence_logprobs.mul(a).mean().neg()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    fn close(a: &[f64], b: &[f64]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-9)
    }

    #[test]
    fn hand_computed_advantages() {
        // 1 − (2+3+6)/3, 2 − (1+3+6)/3, 3 − (1+2+6)/3, 6 − (1+2+3)/3
        let a = rloo_advantages(&[1.0, 2.0, 3.0, 6.0], 4);
        assert!(
            close(&a, &[1.0 - 11.0 / 3.0, 2.0 - 10.0 / 3.0, 0.0, 4.0]),
            "{a:?}"
        );
        let b = rloo_advantages(&[1.0, 3.0, 5.0, 5.0], 2);
        assert!(close(&b, &[-2.0, 2.0, 0.0, 0.0]), "{b:?}");
    }

    #[test]
    fn advantages_sum_to_zero_per_prompt() {
        let rewards: Vec<f64> = (0..24)
            .map(|i| ((i * 37) % 11) as f64 * 0.3 - 1.0)
            .collect();
        for k in [2, 3, 4, 6] {
            for group in rloo_advantages(&rewards, k).chunks(k) {
                assert!(group.iter().sum::<f64>().abs() < 1e-12, "k {k}: {group:?}");
            }
        }
    }

    #[test]
    fn equal_rewards_give_no_signal() {
        assert!(close(&rloo_advantages(&[0.7; 6], 3), &[0.0; 6]));
    }

    #[test]
    #[should_panic(expected = "at least 2 samples")]
    fn one_sample_per_prompt_has_no_baseline() {
        rloo_advantages(&[1.0, 2.0], 1);
    }

    #[test]
    fn shaped_reward_by_hand() {
        // 2 − 0.1·3 − 0.01·20
        assert!((shaped_reward(2.0, 3.0, 0.1, 0.01, 20) - 1.5).abs() < 1e-12);
    }

    #[test]
    fn loss_value_and_gradient() {
        let device = Device::default().autodiff();
        let s = Tensor::<1>::from_data(TensorData::new(vec![-2.0f32, -1.0, -4.0], [3]), &device)
            .require_grad();
        let adv = [1.0, -0.5, 2.0];
        let loss = policy_gradient_loss(s.clone(), &adv);
        // −(1·(−2) + (−0.5)·(−1) + 2·(−4))/3 = 9.5/3
        let v = loss.clone().into_scalar::<f64>();
        assert!((v - 9.5 / 3.0).abs() < 1e-6, "{v}");
        let grads = loss.backward();
        let g = s
            .grad(&grads)
            .unwrap()
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap();
        // ∂L/∂s_i = −A_i/N
        let want = [-1.0 / 3.0, 0.5 / 3.0, -2.0 / 3.0];
        for (g, w) in g.iter().zip(want) {
            assert!((f64::from(*g) - w).abs() < 1e-6, "{g} vs {w}");
        }
    }
}
