//! Group-relative advantages over the K samples of one prompt, the
//! alternatives to RLOO's leave-one-out baseline ([`crate::rloo`]):
//!
//! GRPO (DeepSeekMath, arXiv 2402.03300)
//! `A_i = (r_i − mean_j r_j) / (std_j r_j + ε)`, with the group's sample
//! standard deviation (K − 1 in the denominator, as TRL computes it) and
//! ε = 1e-4;
//!
//! Dr. GRPO (arXiv 2503.20783) `A_i = r_i − mean_j r_j`, without the std
//! normalisation that weights easy and hard prompts differently.
//!
//! Both sum to zero over a group; RLOO's is Dr. GRPO's scaled by K/(K − 1).

/// ε of GRPO's normalisation.
pub const GRPO_EPS: f64 = 1e-4;

/// Which baseline the policy gradient subtracts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Advantage {
    /// `r_i − mean_{j≠i} r_j`.
    Rloo,
    /// `(r_i − mean_j r_j) / (std_j r_j + ε)`.
    Grpo,
    /// `r_i − mean_j r_j`.
    DrGrpo,
}

impl Advantage {
    /// The advantages of consecutive groups of `k` rewards.
    ///
    /// # Panics
    /// When `k < 2` or `rewards.len()` is not a multiple of `k`.
    pub fn of(self, rewards: &[f64], k: usize) -> Vec<f64> {
        match self {
            Advantage::Rloo => crate::rloo::rloo_advantages(rewards, k),
            Advantage::Grpo => group_centred(rewards, k, true),
            Advantage::DrGrpo => group_centred(rewards, k, false),
        }
    }
}

fn group_centred(rewards: &[f64], k: usize, normalise: bool) -> Vec<f64> {
    assert!(
        k >= 2,
        "a group baseline needs at least 2 samples per prompt"
    );
    assert_eq!(rewards.len() % k, 0, "rewards come in groups of {k}");
    rewards
        .chunks(k)
        .flat_map(|group| {
            let mean = group.iter().sum::<f64>() / k as f64;
            let var = group.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (k - 1) as f64;
            let scale = if normalise {
                var.sqrt() + GRPO_EPS
            } else {
                1.0
            };
            group.iter().map(move |r| (r - mean) / scale)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < tol)
    }

    #[test]
    fn grpo_by_hand() {
        // group 1, 2, 3, 6: mean 3, sample variance (4 + 1 + 0 + 9)/3 = 14/3
        let sd = (14.0f64 / 3.0).sqrt() + GRPO_EPS;
        let a = Advantage::Grpo.of(&[1.0, 2.0, 3.0, 6.0], 4);
        assert!(
            close(&a, &[-2.0 / sd, -1.0 / sd, 0.0, 3.0 / sd], 1e-12),
            "{a:?}"
        );
        // equal rewards: no signal, and no division by zero
        assert_eq!(Advantage::Grpo.of(&[0.5; 3], 3), [0.0; 3]);
    }

    #[test]
    fn dr_grpo_by_hand_and_rloo_is_it_scaled() {
        let r = [1.0, 2.0, 3.0, 6.0, 0.0, 1.0, 0.0, 3.0];
        let dr = Advantage::DrGrpo.of(&r, 4);
        // means 3 and 1
        assert!(close(
            &dr,
            &[-2.0, -1.0, 0.0, 3.0, -1.0, 0.0, -1.0, 2.0],
            1e-12
        ));
        let rloo = Advantage::Rloo.of(&r, 4);
        let scaled: Vec<f64> = dr.iter().map(|a| a * 4.0 / 3.0).collect();
        assert!(close(&rloo, &scaled, 1e-12), "{rloo:?}");
    }

    #[test]
    #[should_panic(expected = "at least 2 samples")]
    fn one_sample_per_prompt_has_no_group() {
        Advantage::Grpo.of(&[1.0], 1);
    }
}
