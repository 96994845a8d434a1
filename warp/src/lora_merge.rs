//! WARP's merge of LoRA policies on one base, exactly and without forming a
//! full model: every task vector is low-rank, `δ_m = Σ_t s_m·B_{m,t}·A_{m,t}`
//! (`s_m = α_m/r_m`, one term per adapted tensor `t`), so per layer group
//! the dot products the SLERP needs come from the factors,
//!
//! `⟨δ_i, δ_j⟩ = Σ_t s_i·s_j·tr((B_iᵀB_j)(A_j·A_iᵀ))`,
//!
//! the recursive M-way SLERP of [`crate::slerp`] runs on coefficient
//! vectors (`slerp_m = Σ_i c_i·δ_i`, with the same angles, LERP fallback and
//! λ = 1/m), and LITI's `θ_init + η·Σ_i c_i·δ_i` is itself a LoRA adapter of
//! rank `Σ r_m` on the base: `B' = [η·c_1·s_1·B_1 | … ]`, `A' = [A_1; …]`,
//! scale 1 (`α' = r'`).

use std::collections::BTreeMap;

use posttrain_model::HostTensor;

use crate::WarpError;
use crate::slerp::{GroupAngle, group_of};

const PARALLEL: f64 = 1e-6;

/// One policy's factors, `(A [r, in], B [out, r])` by adapted weight name
/// (`model.layers.0.self_attn.q_proj.weight`), and its scale α/r.
pub struct LoraPolicy {
    pub factors: BTreeMap<String, (HostTensor, HostTensor)>,
    pub scale: f64,
    pub rank: usize,
}

/// `tr((B_iᵀB_j)(A_j·A_iᵀ))` = `⟨B_i·A_i, B_j·A_j⟩` (Frobenius).
fn factor_dot(a_i: &HostTensor, b_i: &HostTensor, a_j: &HostTensor, b_j: &HostTensor) -> f64 {
    let (ri, rj) = (a_i.shape[0], a_j.shape[0]);
    let (out, inp) = (b_i.shape[0], a_i.shape[1]);
    // B_iᵀB_j: [ri, rj]; A_j·A_iᵀ: [rj, ri]
    let mut bb = vec![0f64; ri * rj];
    for o in 0..out {
        for p in 0..ri {
            let x = b_i.data[o * ri + p] as f64;
            for q in 0..rj {
                bb[p * rj + q] += x * b_j.data[o * rj + q] as f64;
            }
        }
    }
    let mut aa = vec![0f64; rj * ri];
    for q in 0..rj {
        for p in 0..ri {
            aa[q * ri + p] = (0..inp)
                .map(|k| a_j.data[q * inp + k] as f64 * a_i.data[p * inp + k] as f64)
                .sum();
        }
    }
    (0..ri)
        .map(|p| {
            (0..rj)
                .map(|q| bb[p * rj + q] * aa[q * ri + p])
                .sum::<f64>()
        })
        .sum()
}

/// Per layer group, the merge's coefficient of each policy's task vector,
/// and the angles of each recursion step (as [`crate::slerp_all`] logs them).
#[allow(clippy::type_complexity)]
pub fn coefficients(
    policies: &[LoraPolicy],
) -> Result<(BTreeMap<String, Vec<f64>>, Vec<Vec<GroupAngle>>), WarpError> {
    let m = policies.len();
    if m == 0 {
        return Err(WarpError::Invalid("no policies to merge".into()));
    }
    let mut names: Vec<&String> = policies.iter().flat_map(|p| p.factors.keys()).collect();
    names.sort();
    names.dedup();
    let mut groups: BTreeMap<String, Vec<&String>> = BTreeMap::new();
    for n in names {
        groups.entry(group_of(n).to_string()).or_default().push(n);
    }
    let mut coeffs = BTreeMap::new();
    let mut angles: Vec<Vec<GroupAngle>> = vec![Vec::new(); m.saturating_sub(1)];
    for (group, tensors) in &groups {
        // the Gram matrix of the task vectors in this group
        let mut gram = vec![0f64; m * m];
        for i in 0..m {
            for j in i..m {
                let mut dot = 0.0;
                for t in tensors {
                    if let (Some((ai, bi)), Some((aj, bj))) =
                        (policies[i].factors.get(*t), policies[j].factors.get(*t))
                    {
                        dot += policies[i].scale * policies[j].scale * factor_dot(ai, bi, aj, bj);
                    }
                }
                gram[i * m + j] = dot;
                gram[j * m + i] = dot;
            }
        }
        let quad = |x: &[f64], y: &[f64]| -> f64 {
            (0..m)
                .map(|i| (0..m).map(|j| x[i] * gram[i * m + j] * y[j]).sum::<f64>())
                .sum()
        };
        let mut c = vec![0f64; m];
        c[0] = 1.0;
        for k in 1..m {
            let lambda = 1.0 / (k + 1) as f64;
            let mut e = vec![0f64; m];
            e[k] = 1.0;
            let norms = (quad(&c, &c) * quad(&e, &e)).sqrt();
            let omega = if norms > 0.0 {
                (quad(&c, &e) / norms).clamp(-1.0, 1.0).acos()
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
            for (ci, ei) in c.iter_mut().zip(&e) {
                *ci = c1 * *ci + c2 * ei;
            }
            angles[k - 1].push(GroupAngle {
                group: group.clone(),
                omega,
                lerp,
            });
        }
        coeffs.insert(group.clone(), c);
    }
    Ok((coeffs, angles))
}

/// The LITI point `θ_init + η·Σ_i c_i·δ_i` as one adapter: per adapted
/// weight, `(A' [Σr, in], B' [out, Σr])` with scale 1.
pub fn merged_adapter(
    policies: &[LoraPolicy],
    coeffs: &BTreeMap<String, Vec<f64>>,
    eta: f64,
) -> BTreeMap<String, (HostTensor, HostTensor)> {
    let total: usize = policies.iter().map(|p| p.rank).sum();
    let mut names: Vec<&String> = policies.iter().flat_map(|p| p.factors.keys()).collect();
    names.sort();
    names.dedup();
    let mut out = BTreeMap::new();
    for name in names {
        let (out_dim, in_dim) = policies
            .iter()
            .find_map(|p| p.factors.get(name))
            .map(|(a, b)| (b.shape[0], a.shape[1]))
            .expect("a policy adapts it");
        let c = &coeffs[group_of(name)];
        let mut a = vec![0f32; total * in_dim];
        let mut b = vec![0f32; out_dim * total];
        let mut at = 0;
        for (i, p) in policies.iter().enumerate() {
            if let Some((pa, pb)) = p.factors.get(name) {
                a[at * in_dim..(at + p.rank) * in_dim].copy_from_slice(&pa.data);
                let k = (eta * c[i] * p.scale) as f32;
                for o in 0..out_dim {
                    for q in 0..p.rank {
                        b[o * total + at + q] = k * pb.data[o * p.rank + q];
                    }
                }
            }
            at += p.rank;
        }
        out.insert(
            name.clone(),
            (
                HostTensor {
                    shape: vec![total, in_dim],
                    data: a,
                },
                HostTensor {
                    shape: vec![out_dim, total],
                    data: b,
                },
            ),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize], data: &[f32]) -> HostTensor {
        HostTensor {
            shape: shape.to_vec(),
            data: data.to_vec(),
        }
    }

    /// The dense product `s·B·A`.
    fn dense(a: &HostTensor, b: &HostTensor, s: f64) -> Vec<f64> {
        let (r, inp, out) = (a.shape[0], a.shape[1], b.shape[0]);
        let mut w = vec![0f64; out * inp];
        for o in 0..out {
            for k in 0..inp {
                w[o * inp + k] = s
                    * (0..r)
                        .map(|q| b.data[o * r + q] as f64 * a.data[q * inp + k] as f64)
                        .sum::<f64>();
            }
        }
        w
    }

    #[test]
    fn factor_dot_is_the_frobenius_product_of_the_dense_deltas() {
        let a1 = t(&[2, 3], &[1.0, 0.5, -1.0, 0.0, 2.0, 1.0]);
        let b1 = t(&[2, 2], &[1.0, -1.0, 0.5, 2.0]);
        let a2 = t(&[1, 3], &[0.3, -0.2, 0.7]);
        let b2 = t(&[2, 1], &[2.0, -1.5]);
        let want: f64 = dense(&a1, &b1, 1.0)
            .iter()
            .zip(dense(&a2, &b2, 1.0))
            .map(|(x, y)| x * y)
            .sum();
        assert!((factor_dot(&a1, &b1, &a2, &b2) - want).abs() < 1e-12);
    }

    #[test]
    fn orthogonal_unit_task_vectors_by_hand() {
        // δ1 = e1·e1ᵀ, δ2 = e2·e2ᵀ (2×2): orthogonal, unit norm; λ = ½:
        // c = sin(Ω/2)/sin Ω = 1/√2 each
        let one = |i: usize| {
            let mut a = [0.0; 2];
            a[i] = 1.0;
            let mut factors = BTreeMap::new();
            factors.insert(
                "model.layers.0.mlp.up_proj.weight".to_string(),
                (t(&[1, 2], &a), t(&[2, 1], &a)),
            );
            LoraPolicy {
                factors,
                scale: 1.0,
                rank: 1,
            }
        };
        let policies = [one(0), one(1)];
        let (c, angles) = coefficients(&policies).unwrap();
        let c = &c["model.layers.0"];
        let s = std::f64::consts::FRAC_1_SQRT_2;
        assert!(
            (c[0] - s).abs() < 1e-12 && (c[1] - s).abs() < 1e-12,
            "{c:?}"
        );
        assert!((angles[0][0].omega - std::f64::consts::FRAC_PI_2).abs() < 1e-12);
        // at η = 0.5 the merged delta is 0.5/√2 · diag(1, 1), as rank 2
        let m = merged_adapter(
            &policies,
            &[("model.layers.0".to_string(), c.clone())].into(),
            0.5,
        );
        let (a, b) = &m["model.layers.0.mlp.up_proj.weight"];
        assert_eq!((a.shape.clone(), b.shape.clone()), (vec![2, 2], vec![2, 2]));
        let w = dense(a, b, 1.0);
        let k = 0.5 * s;
        for (got, want) in w.iter().zip([k, 0.0, 0.0, k]) {
            assert!((got - want).abs() < 1e-7, "{w:?}");
        }
    }
}
