//! Linear interpolation towards the initialisation (WARP stage 3):
//!
//! `θ_η = (1 − η)·θ_init + η·θ_slerp`
//!
//! η trades reward (η → 1) for KL to the init (η → 0); a sweep of η traces
//! the KL–reward Pareto front and η = 0.3 seeds the next WARP iteration.

use posttrain_model::params::ParamMap;

use crate::{WarpError, combine, weighted};

pub fn liti(init: &ParamMap, merged: &ParamMap, eta: f64) -> Result<ParamMap, WarpError> {
    if !eta.is_finite() {
        return Err(WarpError::Invalid(format!("η must be finite, got {eta}")));
    }
    combine(init, merged, |i, m| weighted(i, 1.0 - eta, m, eta))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{close, map, values};

    #[test]
    fn endpoints_and_a_hand_computed_point() {
        let init = map(&[("w", &[1.0, 0.0, -1.0])]);
        let merged = map(&[("w", &[3.0, 5.0, 1.0])]);
        assert_eq!(
            values(&liti(&init, &merged, 0.0).unwrap(), "w"),
            values(&init, "w")
        );
        assert_eq!(
            values(&liti(&init, &merged, 1.0).unwrap(), "w"),
            values(&merged, "w")
        );
        // 0.7·1 + 0.3·3 = 1.6; 0.3·5 = 1.5; −0.7 + 0.3 = −0.4
        let mid = liti(&init, &merged, 0.3).unwrap();
        assert!(close(&values(&mid, "w"), &[1.6, 1.5, -0.4], 1e-6));
    }

    #[test]
    fn refuses_mismatched_models() {
        let init = map(&[("w", &[1.0])]);
        let merged = map(&[("v", &[1.0])]);
        assert!(matches!(
            liti(&init, &merged, 0.3),
            Err(WarpError::Mismatch { .. })
        ));
    }
}
