//! Exponential moving average of the policy, WARP's anchor:
//!
//! `θ_ema ← (1 − μ)·θ_ema + μ·θ`
//!
//! applied after every optimizer step (μ = 0.01 by default), so the KL
//! regularisation pulls towards a slowly moving, improving policy rather
//! than the fixed SFT initialisation.

use posttrain_model::params::ParamMap;

use crate::{WarpError, combine, weighted};

pub fn ema(anchor: &ParamMap, policy: &ParamMap, mu: f64) -> Result<ParamMap, WarpError> {
    if !(0.0..=1.0).contains(&mu) {
        return Err(WarpError::Invalid(format!(
            "μ must lie in [0, 1], got {mu}"
        )));
    }
    combine(anchor, policy, |a, p| weighted(a, 1.0 - mu, p, mu))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{close, map, values};

    #[test]
    fn hand_computed_step() {
        let anchor = map(&[("w", &[1.0, -2.0, 0.0])]);
        let policy = map(&[("w", &[3.0, 2.0, 10.0])]);
        // 0.9·1 + 0.1·3 = 1.2; 0.9·(−2) + 0.1·2 = −1.6; 0.1·10 = 1
        let out = ema(&anchor, &policy, 0.1).unwrap();
        assert!(close(&values(&out, "w"), &[1.2, -1.6, 1.0], 1e-6));
    }

    #[test]
    fn mu_one_copies_the_policy_and_mu_zero_keeps_the_anchor() {
        let anchor = map(&[("w", &[1.0, -2.0]), ("b", &[0.5])]);
        let policy = map(&[("w", &[3.0, 2.0]), ("b", &[-4.0])]);
        let copied = ema(&anchor, &policy, 1.0).unwrap();
        let kept = ema(&anchor, &policy, 0.0).unwrap();
        for name in ["w", "b"] {
            assert_eq!(values(&copied, name), values(&policy, name));
            assert_eq!(values(&kept, name), values(&anchor, name));
        }
    }

    #[test]
    fn repeated_steps_approach_a_fixed_policy_geometrically() {
        let mut anchor = map(&[("w", &[0.0])]);
        let policy = map(&[("w", &[1.0])]);
        for _ in 0..10 {
            anchor = ema(&anchor, &policy, 0.01).unwrap();
        }
        // 1 − 0.99^10
        assert!(close(&values(&anchor, "w"), &[0.095_617_9], 1e-6));
    }

    #[test]
    fn refuses_mu_outside_unit_interval() {
        let a = map(&[("w", &[0.0])]);
        assert!(ema(&a, &a, 1.5).is_err());
        assert!(ema(&a, &a, f64::NAN).is_err());
    }
}
