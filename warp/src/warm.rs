//! Weight averaged reward models (WARM, arXiv 2401.12187): M reward models
//! fine-tuned from one shared initialisation, averaged in weight space,
//!
//! `θ_WARM = Σ_m w_m·θ_m`, `Σ_m w_m = 1` (uniform `w_m = 1/M` by default).
//!
//! Fine-tuned from one initialisation the models stay linearly connected, so
//! the average is one model that scores like the prediction ensemble
//! `Σ_m w_m·r_m(x, y)` at the cost of one, and is more robust under
//! distribution shift than any member.

use posttrain_model::params::ParamMap;

use crate::{WarpError, combine};

/// The weights as given, normalised to sum 1; uniform without any.
pub fn normalised_weights(models: usize, weights: Option<&[f64]>) -> Result<Vec<f64>, WarpError> {
    let Some(w) = weights else {
        return Ok(vec![1.0 / models as f64; models]);
    };
    if w.len() != models {
        return Err(WarpError::Invalid(format!(
            "{} weights for {models} models",
            w.len()
        )));
    }
    if let Some(bad) = w.iter().find(|x| !(x.is_finite() && **x >= 0.0)) {
        return Err(WarpError::Invalid(format!(
            "weights must be non-negative numbers, got {bad}"
        )));
    }
    let sum: f64 = w.iter().sum();
    if sum <= 0.0 {
        return Err(WarpError::Invalid("weights sum to 0".into()));
    }
    Ok(w.iter().map(|x| x / sum).collect())
}

/// `Σ_m w_m·θ_m` over models with one tensor set (weights as
/// [`normalised_weights`] makes them).
pub fn warm(models: &[ParamMap], weights: Option<&[f64]>) -> Result<ParamMap, WarpError> {
    if models.len() < 2 {
        return Err(WarpError::Invalid(format!(
            "averaging needs at least two models, got {}",
            models.len()
        )));
    }
    let w = normalised_weights(models.len(), weights)?;
    let first = &models[0];
    let mut sum = combine(first, first, |a, _| a.mul_scalar(w[0]))?;
    for (m, wm) in models.iter().zip(&w).skip(1) {
        sum = combine(&sum, m, |acc, x| acc.add(x.mul_scalar(*wm)))?;
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{close, map, values};

    fn three() -> Vec<ParamMap> {
        vec![
            map(&[("w", &[1.0, 2.0]), ("b", &[4.0])]),
            map(&[("w", &[3.0, -2.0]), ("b", &[0.0])]),
            map(&[("w", &[5.0, 0.0]), ("b", &[-1.0])]),
        ]
    }

    #[test]
    fn uniform_average_by_hand() {
        // (1 + 3 + 5)/3 = 3; (2 − 2 + 0)/3 = 0; (4 + 0 − 1)/3 = 1
        let avg = warm(&three(), None).unwrap();
        assert!(close(&values(&avg, "w"), &[3.0, 0.0], 1e-6));
        assert!(close(&values(&avg, "b"), &[1.0], 1e-6));
    }

    #[test]
    fn weights_are_normalised_then_applied() {
        // 2:1:1 is 0.5, 0.25, 0.25: 0.5 + 0.75 + 1.25 = 2.5; 1 − 0.5 + 0 = 0.5; 2 + 0 − 0.25
        let avg = warm(&three(), Some(&[2.0, 1.0, 1.0])).unwrap();
        assert!(close(&values(&avg, "w"), &[2.5, 0.5], 1e-6));
        assert!(close(&values(&avg, "b"), &[1.75], 1e-6));
        // all weight on one model is that model
        let one = warm(&three(), Some(&[0.0, 1.0, 0.0])).unwrap();
        assert_eq!(values(&one, "w"), values(&three()[1], "w"));
    }

    #[test]
    fn refuses_one_model_bad_weights_and_other_tensor_sets() {
        let m = three();
        assert!(matches!(warm(&m[..1], None), Err(WarpError::Invalid(_))));
        assert!(matches!(
            warm(&m, Some(&[1.0, 1.0])),
            Err(WarpError::Invalid(_))
        ));
        assert!(matches!(
            warm(&m, Some(&[1.0, -1.0, 1.0])),
            Err(WarpError::Invalid(_))
        ));
        let other = vec![m[0].clone(), map(&[("w", &[1.0, 2.0])])];
        assert!(matches!(
            warm(&other, None),
            Err(WarpError::Mismatch { .. })
        ));
    }
}
