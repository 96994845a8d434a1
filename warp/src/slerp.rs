//! Spherical linear interpolation of task vectors, per layer (WARP stage 2).
//! With `δ_m = θ_m − θ_init` restricted to one group of tensors (a decoder
//! layer `model.layers.{i}.*`; every other tensor, e.g. the embeddings or
//! the final norm, is a group of its own):
//!
//! `Ω = arccos(δ₁·δ₂ / (‖δ₁‖‖δ₂‖))`
//! `θ = θ_init + sin((1 − λ)Ω)/sin Ω · δ₁ + sin(λΩ)/sin Ω · δ₂`
//!
//! Each group has its own angle. When sin Ω ≈ 0 (parallel or opposite task
//! vectors, or a zero one) it falls back to linear interpolation
//! `θ_init + (1 − λ)δ₁ + λδ₂`. For M > 2 policies, recursively
//! `slerp_m = slerp(slerp_{m−1}, θ_m, λ = 1/m)`.

use std::collections::BTreeMap;

use burn::tensor::Tensor;
use posttrain_model::params::ParamMap;

use crate::{WarpError, check_same};

/// Below this sin Ω the two task vectors count as parallel.
const PARALLEL: f64 = 1e-6;

/// The angle one group's task vectors made.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GroupAngle {
    pub group: String,
    /// Ω in radians.
    pub omega: f64,
    /// Linear interpolation was used (sin Ω ≈ 0).
    pub lerp: bool,
}

/// The group a tensor belongs to: its decoder layer, or itself.
pub fn group_of(name: &str) -> &str {
    if let Some(rest) = name.strip_prefix("model.layers.")
        && let Some(end) = rest.find('.')
    {
        return &name[.."model.layers.".len() + end];
    }
    name
}

fn sum_product(a: &[Tensor<1>], b: &[Tensor<1>]) -> Tensor<1> {
    a.iter()
        .zip(b)
        .map(|(x, y)| x.clone().mul(y.clone()).sum())
        .reduce(|s, t| s.add(t))
        .expect("a group has a tensor")
}

pub fn slerp(
    init: &ParamMap,
    a: &ParamMap,
    b: &ParamMap,
    lambda: f64,
) -> Result<(ParamMap, Vec<GroupAngle>), WarpError> {
    if !(0.0..=1.0).contains(&lambda) {
        return Err(WarpError::Invalid(format!(
            "λ must lie in [0, 1], got {lambda}"
        )));
    }
    check_same(init, a)?;
    check_same(init, b)?;
    let mut groups: BTreeMap<&str, Vec<&String>> = BTreeMap::new();
    for name in init.keys() {
        groups.entry(group_of(name)).or_default().push(name);
    }
    let mut out = ParamMap::new();
    let mut angles = Vec::with_capacity(groups.len());
    for (group, names) in groups {
        let delta = |m: &ParamMap| -> Vec<Tensor<1>> {
            names
                .iter()
                .map(|n| m[*n].value.clone().sub(init[*n].value.clone()))
                .collect()
        };
        let (d1, d2) = (delta(a), delta(b));
        let sums = Tensor::cat(
            vec![
                sum_product(&d1, &d2),
                sum_product(&d1, &d1),
                sum_product(&d2, &d2),
            ],
            0,
        )
        .into_data()
        .try_into_vec_as::<f64>()
        .expect("three sums");
        let norms = (sums[1] * sums[2]).sqrt();
        let omega = if norms > 0.0 {
            (sums[0] / norms).clamp(-1.0, 1.0).acos()
        } else {
            0.0
        };
        let lerp = omega.sin() < PARALLEL;
        let (c1, c2) = if lerp {
            (1.0 - lambda, lambda)
        } else {
            (
                ((1.0 - lambda) * omega).sin() / omega.sin(),
                (lambda * omega).sin() / omega.sin(),
            )
        };
        for ((name, x), y) in names.iter().zip(d1).zip(d2) {
            let p = &init[*name];
            let value = p.value.clone().add(x.mul_scalar(c1)).add(y.mul_scalar(c2));
            out.insert((*name).clone(), p.with(value));
        }
        angles.push(GroupAngle {
            group: group.to_string(),
            omega,
            lerp,
        });
    }
    Ok((out, angles))
}

/// The M-way merge: `slerp_m = slerp(slerp_{m−1}, θ_m, 1/m)`; one list of
/// angles per recursion step.
pub fn slerp_all(
    init: &ParamMap,
    policies: &[ParamMap],
) -> Result<(ParamMap, Vec<Vec<GroupAngle>>), WarpError> {
    let (first, rest) = policies
        .split_first()
        .ok_or_else(|| WarpError::Invalid("no policies to merge".into()))?;
    check_same(init, first)?;
    let mut merged = first.clone();
    let mut angles = Vec::new();
    for (i, policy) in rest.iter().enumerate() {
        let m = i + 2;
        let (next, a) = slerp(init, &merged, policy, 1.0 / m as f64)?;
        merged = next;
        angles.push(a);
    }
    Ok((merged, angles))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{close, map, values};

    const S: f32 = std::f32::consts::FRAC_1_SQRT_2;

    fn norm(v: &[f32]) -> f32 {
        v.iter().map(|x| x * x).sum::<f32>().sqrt()
    }

    fn sub(a: &[f32], b: &[f32]) -> Vec<f32> {
        a.iter().zip(b).map(|(x, y)| x - y).collect()
    }

    #[test]
    fn groups_are_decoder_layers_and_single_tensors() {
        assert_eq!(
            group_of("model.layers.3.mlp.up_proj.weight"),
            "model.layers.3"
        );
        assert_eq!(
            group_of("model.layers.12.input_layernorm.weight"),
            "model.layers.12"
        );
        assert_eq!(
            group_of("model.embed_tokens.weight"),
            "model.embed_tokens.weight"
        );
        assert_eq!(group_of("model.norm.weight"), "model.norm.weight");
    }

    #[test]
    fn orthogonal_unit_task_vectors_by_hand() {
        let init = map(&[("w", &[1.0, 1.0])]);
        let a = map(&[("w", &[2.0, 1.0])]);
        let b = map(&[("w", &[1.0, 2.0])]);
        let (m, angles) = slerp(&init, &a, &b, 0.5).unwrap();
        // Ω = π/2: both coefficients sin(π/4)/1
        assert!(close(&values(&m, "w"), &[1.0 + S, 1.0 + S], 1e-6));
        assert!((angles[0].omega - std::f64::consts::FRAC_PI_2).abs() < 1e-6);
        assert!(!angles[0].lerp);
    }

    #[test]
    fn endpoints_at_lambda_zero_and_one() {
        let init = map(&[("w", &[0.5, -1.0, 2.0]), ("model.norm.weight", &[0.1])]);
        let a = map(&[("w", &[1.5, 0.0, 2.5]), ("model.norm.weight", &[0.3])]);
        let b = map(&[("w", &[-0.5, -0.2, 1.0]), ("model.norm.weight", &[-0.4])]);
        let (at0, _) = slerp(&init, &a, &b, 0.0).unwrap();
        let (at1, _) = slerp(&init, &a, &b, 1.0).unwrap();
        for name in ["w", "model.norm.weight"] {
            assert!(
                close(&values(&at0, name), &values(&a, name), 1e-6),
                "{name}"
            );
            assert!(
                close(&values(&at1, name), &values(&b, name), 1e-6),
                "{name}"
            );
        }
    }

    #[test]
    fn equal_norm_task_vectors_keep_their_norm() {
        // WARP lemma 1: ‖δ₁‖ = ‖δ₂‖ ⇒ ‖slerp − θ_init‖ = ‖δ₁‖ for every λ
        let init = map(&[("w", &[0.3, -0.2, 0.1, 0.0])]);
        let a = map(&[("w", &[0.3 + 3.0, -0.2 + 4.0, 0.1, 0.0])]);
        let b = map(&[("w", &[0.3, -0.2 - 4.0, 0.1 + 3.0, 0.0])]);
        for lambda in [0.1, 0.25, 0.5, 0.8] {
            let (m, _) = slerp(&init, &a, &b, lambda).unwrap();
            let d = sub(&values(&m, "w"), &values(&init, "w"));
            assert!((norm(&d) - 5.0).abs() < 1e-5, "λ {lambda}: {}", norm(&d));
        }
        // while LERP of the same vectors shrinks it
        let lerp: Vec<f32> = [3.0f32, 4.0, 0.0, 0.0]
            .iter()
            .zip([0.0f32, -4.0, 3.0, 0.0])
            .map(|(x, y)| 0.5 * x + 0.5 * y)
            .collect();
        assert!(norm(&lerp) < 4.0);
    }

    #[test]
    fn parallel_task_vectors_fall_back_to_lerp() {
        let init = map(&[("w", &[1.0, 1.0])]);
        let a = map(&[("w", &[2.0, 3.0])]);
        let b = map(&[("w", &[3.0, 5.0])]);
        let (m, angles) = slerp(&init, &a, &b, 0.25).unwrap();
        // 1 + 0.75·(1, 2) + 0.25·(2, 4)
        assert!(close(&values(&m, "w"), &[2.25, 3.5], 1e-6));
        assert!(angles[0].lerp);
        let zero = slerp(&init, &init, &b, 0.5).unwrap();
        assert!(close(&values(&zero.0, "w"), &[2.0, 3.0], 1e-6));
    }

    #[test]
    fn each_layer_has_its_own_angle() {
        let names = ["model.layers.0.a", "model.layers.0.b", "model.layers.1.a"];
        let init = map(&[
            (names[0], &[0.0]),
            (names[1], &[0.0]),
            (names[2], &[0.0, 0.0]),
        ]);
        // layer 0: δ₁ = (1, 0), δ₂ = (0, 1) across its two tensors; layer 1: parallel
        let a = map(&[
            (names[0], &[1.0]),
            (names[1], &[0.0]),
            (names[2], &[1.0, 1.0]),
        ]);
        let b = map(&[
            (names[0], &[0.0]),
            (names[1], &[1.0]),
            (names[2], &[3.0, 3.0]),
        ]);
        let (m, angles) = slerp(&init, &a, &b, 0.5).unwrap();
        assert!(close(&values(&m, names[0]), &[S], 1e-6));
        assert!(close(&values(&m, names[1]), &[S], 1e-6));
        assert!(close(&values(&m, names[2]), &[2.0, 2.0], 1e-6));
        let groups: Vec<&str> = angles.iter().map(|a| a.group.as_str()).collect();
        assert_eq!(groups, ["model.layers.0", "model.layers.1"]);
        assert!(!angles[0].lerp && angles[1].lerp);
    }

    #[test]
    fn three_way_merge_by_hand() {
        let init = map(&[("w", &[0.0, 0.0, 0.0])]);
        let p = [
            map(&[("w", &[1.0, 0.0, 0.0])]),
            map(&[("w", &[0.0, 1.0, 0.0])]),
            map(&[("w", &[0.0, 0.0, 1.0])]),
        ];
        let (m, angles) = slerp_all(&init, &p).unwrap();
        // slerp(e₁, e₂, ½) = (s, s, 0); then with e₃ at λ = ⅓, Ω = π/2:
        // sin(π/3)·(s, s, 0) + sin(π/6)·e₃
        let c = (std::f32::consts::PI / 3.0).sin() * S;
        assert!(close(&values(&m, "w"), &[c, c, 0.5], 1e-6));
        assert_eq!(angles.len(), 2);
        let (one, none) = slerp_all(&init, &p[..1]).unwrap();
        assert_eq!(values(&one, "w"), [1.0, 0.0, 0.0]);
        assert!(none.is_empty());
        assert!(slerp_all(&init, &[]).is_err());
    }

    #[test]
    fn refuses_mismatched_shapes() {
        let init = map(&[("w", &[0.0, 0.0])]);
        let a = map(&[("w", &[1.0, 0.0])]);
        let b = map(&[("w", &[1.0, 0.0, 0.0])]);
        let e = slerp(&init, &a, &b, 0.5).unwrap_err();
        assert_eq!(e.to_string(), "tensor w: shapes differ: [2] vs [3]");
    }
}
