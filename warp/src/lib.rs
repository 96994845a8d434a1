//! Weight-space algebra of WARP (arXiv 2406.16768) on parameter maps: the
//! EMA anchor, per-layer spherical interpolation of task vectors (M-way by
//! recursion) and linear interpolation towards the initialisation (LITI);
//! and WARM's weight average of reward models (arXiv 2401.12187).
//! Every operation checks that its inputs hold the same tensor set.

pub mod ema;
pub mod liti;
pub mod lora_merge;
pub mod slerp;
pub mod warm;

use posttrain_model::params::ParamMap;

pub use ema::ema;
pub use liti::liti;
pub use slerp::{GroupAngle, slerp, slerp_all};
pub use warm::{normalised_weights, warm};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WarpError {
    #[error("tensor {name}: {reason}")]
    Mismatch { name: String, reason: String },
    #[error("{0}")]
    Invalid(String),
}

/// Checks that `b` has exactly `a`'s tensor names and shapes.
pub fn check_same(a: &ParamMap, b: &ParamMap) -> Result<(), WarpError> {
    for (name, p) in a {
        match b.get(name) {
            None => {
                return Err(WarpError::Mismatch {
                    name: name.clone(),
                    reason: "missing in one of the models".into(),
                });
            }
            Some(q) if q.shape != p.shape => {
                return Err(WarpError::Mismatch {
                    name: name.clone(),
                    reason: format!("shapes differ: {:?} vs {:?}", p.shape, q.shape),
                });
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = b.keys().find(|k| !a.contains_key(*k)) {
        return Err(WarpError::Mismatch {
            name: extra.clone(),
            reason: "present in only one of the models".into(),
        });
    }
    Ok(())
}

/// `a·ca + b·cb`, fused on flex.
fn weighted(
    a: burn::tensor::Tensor<1>,
    ca: f64,
    b: burn::tensor::Tensor<1>,
    cb: f64,
) -> burn::tensor::Tensor<1> {
    posttrain_model::kernels::weighted_sum::weighted_sum(a, ca, b, cb).unwrap_or_else(|back| {
        let (a, b) = *back;
        a.mul_scalar(ca).add(b.mul_scalar(cb))
    })
}

/// `Σ_names f(a, b)` with `f` elementwise, tensor by tensor.
fn combine(
    a: &ParamMap,
    b: &ParamMap,
    f: impl Fn(burn::tensor::Tensor<1>, burn::tensor::Tensor<1>) -> burn::tensor::Tensor<1>,
) -> Result<ParamMap, WarpError> {
    check_same(a, b)?;
    Ok(a.iter()
        .map(|(name, p)| {
            let q = &b[name];
            (name.clone(), p.with(f(p.value.clone(), q.value.clone())))
        })
        .collect())
}

#[cfg(test)]
pub(crate) mod testing {
    use burn::tensor::{Device, Tensor, TensorData};
    use posttrain_model::params::{ParamMap, ParamTensor};

    /// A map from `(name, values)` pairs, each a flat tensor.
    pub fn map(entries: &[(&str, &[f32])]) -> ParamMap {
        entries
            .iter()
            .map(|(name, v)| {
                let value =
                    Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), &Device::default());
                (
                    name.to_string(),
                    ParamTensor {
                        shape: vec![v.len()],
                        value,
                    },
                )
            })
            .collect()
    }

    pub fn values(m: &ParamMap, name: &str) -> Vec<f32> {
        m[name].to_host().data
    }

    pub fn close(a: &[f32], b: &[f32], tol: f32) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::map;
    use super::*;

    #[test]
    fn different_tensor_sets_are_named() {
        let a = map(&[("x", &[1.0, 2.0]), ("y", &[1.0])]);
        let b = map(&[("x", &[1.0, 2.0])]);
        assert_eq!(
            check_same(&a, &b).unwrap_err().to_string(),
            "tensor y: missing in one of the models"
        );
        assert_eq!(
            check_same(&b, &a).unwrap_err().to_string(),
            "tensor y: present in only one of the models"
        );
        let c = map(&[("x", &[1.0, 2.0, 3.0]), ("y", &[1.0])]);
        assert_eq!(
            check_same(&a, &c).unwrap_err().to_string(),
            "tensor x: shapes differ: [2] vs [3]"
        );
    }
}
