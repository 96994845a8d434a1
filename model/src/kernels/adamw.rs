//! One AdamW step over a parameter, its gradient and both moments in one
//! pass, in place (Burn's `AdamW` makes ~16 single-threaded passes, each
//! into a new tensor):
//! `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
//! `p ← p·(1 − lr·λ) − lr·(m/c₁) / (√(v/c₂) + ε)`, `cᵢ = 1 − βᵢᵗ`.

use rayon::prelude::*;

use super::{GRAIN, multiversion};

/// The step's scalars, in f32 as Burn's `AdamW` applies them.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// `1 − lr·λ`.
    pub decay: f32,
    /// `1 − β₁ᵗ`, `1 − β₂ᵗ` at this step's `t` (1 on the first step).
    pub c1: f32,
    pub c2: f32,
}

multiversion! {
    fn chunk(s: &AdamWStep, first: bool, g: &[f32], p: &mut [f32], m: &mut [f32], v: &mut [f32]) {
        let (f1, f2) = (1.0 - s.beta1, 1.0 - s.beta2);
        for i in 0..p.len() {
            let g = g[i];
            // the same operations in the same order as Burn's AdamW
            let (mi, vi) = if first {
                (g * f1, (g * g) * f2)
            } else {
                (m[i] * s.beta1 + g * f1, v[i] * s.beta2 + (g * g) * f2)
            };
            m[i] = mi;
            v[i] = vi;
            let delta = (mi / s.c1) / ((vi / s.c2).sqrt() + s.eps);
            p[i] = p[i] * s.decay - delta * s.lr;
        }
    }
}

/// One step with gradient `g`, in place on the parameter `p` and the moments
/// `m`, `v` (whose values are not read on the `first` step).
pub fn adamw_step(
    s: &AdamWStep,
    first: bool,
    g: &[f32],
    p: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
) {
    assert!(p.len() == g.len() && m.len() == g.len() && v.len() == g.len());
    p.par_chunks_mut(GRAIN)
        .zip(m.par_chunks_mut(GRAIN).zip(v.par_chunks_mut(GRAIN)))
        .zip(g.par_chunks(GRAIN))
        .for_each(|((p, (m, v)), g)| chunk(s, first, g, p, m, v));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_hand() {
        // t = 1, g = 2, β₁ 0.9, β₂ 0.99: m = 0.2, v = 0.04, m/c₁ = 2, v/c₂ = 4,
        // p = 1·(1 − 0.1·0.5) − 0.1·2/(2 + 0) = 0.95 − 0.1 = 0.85
        let s = AdamWStep {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            eps: 0.0,
            decay: 0.95,
            c1: 0.1,
            c2: 0.01,
        };
        let (mut p, mut m, mut v) = ([1.0], [f32::NAN], [f32::NAN]);
        adamw_step(&s, true, &[2.0], &mut p, &mut m, &mut v);
        assert!(
            (m[0] - 0.2).abs() < 1e-7 && (v[0] - 0.04).abs() < 1e-7,
            "{m:?} {v:?}"
        );
        assert!((p[0] - 0.85).abs() < 1e-6, "{p:?}");
        // a second step from there with g = 0: m = 0.18, v = 0.0396
        let s2 = AdamWStep {
            c1: 1.0 - 0.81,
            c2: 1.0 - 0.9801,
            ..s
        };
        let (mut p2, mut m2, mut v2) = (p, m, v);
        adamw_step(&s2, false, &[0.0], &mut p2, &mut m2, &mut v2);
        assert!((m2[0] - 0.18).abs() < 1e-7 && (v2[0] - 0.0396).abs() < 1e-7);
        let want = 0.85 * 0.95 - 0.1 * (0.18 / 0.19) / (0.0396f32 / 0.0199).sqrt();
        assert!((p2[0] - want).abs() < 1e-6, "{p2:?} vs {want}");
    }
}
