//! One AdamW step over a parameter, its gradient and both moments in one
//! pass (Burn's `AdamW` makes ~16 single-threaded passes):
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

/// The parameter and both moments, before or after a step.
pub struct Moments<'a> {
    pub p: &'a [f32],
    /// Empty before the first step (zeros).
    pub m: &'a [f32],
    pub v: &'a [f32],
}

multiversion! {
    fn chunk(s: &AdamWStep, x: &Moments, g: &[f32], p: &mut [f32], m: &mut [f32], v: &mut [f32]) {
        let (f1, f2) = (1.0 - s.beta1, 1.0 - s.beta2);
        let first = x.m.is_empty();
        for i in 0..p.len() {
            let g = g[i];
            // the same operations in the same order as Burn's AdamW
            let (mi, vi) = if first {
                (g * f1, (g * g) * f2)
            } else {
                (x.m[i] * s.beta1 + g * f1, x.v[i] * s.beta2 + (g * g) * f2)
            };
            m[i] = mi;
            v[i] = vi;
            let delta = (mi / s.c1) / ((vi / s.c2).sqrt() + s.eps);
            p[i] = x.p[i] * s.decay - delta * s.lr;
        }
    }
}

/// The parameter and moments after one step from `x` with gradient `g`.
pub fn adamw_step(s: &AdamWStep, x: &Moments, g: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let n = g.len();
    let (mut p, mut m, mut v) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    let first = x.m.is_empty();
    p.par_chunks_mut(GRAIN)
        .zip(m.par_chunks_mut(GRAIN).zip(v.par_chunks_mut(GRAIN)))
        .enumerate()
        .for_each(|(c, (p, (m, v)))| {
            let r = c * GRAIN..c * GRAIN + p.len();
            let part = Moments {
                p: &x.p[r.clone()],
                m: if first { &[] } else { &x.m[r.clone()] },
                v: if first { &[] } else { &x.v[r.clone()] },
            };
            chunk(s, &part, &g[r], p, m, v);
        });
    (p, m, v)
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
        let x = Moments {
            p: &[1.0],
            m: &[],
            v: &[],
        };
        let (p, m, v) = adamw_step(&s, &x, &[2.0]);
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
        let x = Moments {
            p: &p,
            m: &m,
            v: &v,
        };
        let (p2, m2, v2) = adamw_step(&s2, &x, &[0.0]);
        assert!((m2[0] - 0.18).abs() < 1e-7 && (v2[0] - 0.0396).abs() < 1e-7);
        let want = 0.85 * 0.95 - 0.1 * (0.18 / 0.19) / (0.0396f32 / 0.0199).sqrt();
        assert!((p2[0] - want).abs() < 1e-6, "{p2:?} vs {want}");
    }
}
