//! Gemma's RMSNorm `y = x·r·(1 + w)`, `r = 1/√(mean(x²) + ε)` per row, in
//! one pass.
//!
//! Backward with `h = ∂y ⊙ (1 + w)`:
//! `∂x = r·h − x·r³·(h·x)/n` and `∂w = Σ_rows ∂y ⊙ x·r`.

use burn::backend::Flex;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::tensor::Tensor;

use super::{
    Fused, GRAIN, LANES, apply, chunk, contiguous, f32s, flex_tensor, multiversion, par_outputs,
    shape_of, sum_pairs,
};

/// `x / √(mean(x²) + eps) · (1 + w)` over the last axis on flex; `Err` gives
/// the operands back elsewhere.
pub fn rms_norm<const D: usize>(
    x: Tensor<D>,
    w: Tensor<1>,
    eps: f64,
) -> Result<Tensor<D>, Box<(Tensor<D>, Tensor<1>)>> {
    let n = w.dims()[0];
    if x.dims()[D - 1] != n || n == 0 {
        return Err(Box::new((x, w)));
    }
    // one operand shape for `apply`: w as a row of x's rank
    let mut row = [1; D];
    row[D - 1] = n;
    let w = w.reshape(row);
    apply([x, w], RmsNorm { eps: eps as f32 }).map_err(|[x, w]| Box::new((x, w.reshape([n]))))
}

multiversion! {
    fn forward_rows(x: &[f32], w: &[f32], eps: f32, y: &mut [f32], r: &mut [f32]) {
        let n = w.len();
        for ((x, y), r) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)).zip(r.iter_mut()) {
            let ss = sum_pairs(x, x, |a, b| a * b);
            let inv = 1.0 / (ss / n as f32 + eps).sqrt();
            *r = inv;
            for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                *y = x * inv * (1.0 + w);
            }
        }
    }
}

multiversion! {
    fn backward_rows(x: &[f32], w: &[f32], r: &[f32], d: &[f32], dx: &mut [f32], dw: &mut [f32]) {
        let n = w.len();
        for (((x, d), dx), &r) in x.chunks_exact(n).zip(d.chunks_exact(n)).zip(dx.chunks_exact_mut(n)).zip(r) {
            let dot = dot_weighted(x, d, w);
            let k = r * r * r * dot / n as f32;
            for i in 0..n {
                dx[i] = r * d[i] * (1.0 + w[i]) - x[i] * k;
                dw[i] += d[i] * x[i] * r;
            }
        }
    }
}

/// `Σ d·(1 + w)·x` in [`LANES`] partial sums.
#[inline(always)]
fn dot_weighted(x: &[f32], d: &[f32], w: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let (cx, cd, cw) = (
        x.chunks_exact(LANES),
        d.chunks_exact(LANES),
        w.chunks_exact(LANES),
    );
    let (rx, rd, rw) = (cx.remainder(), cd.remainder(), cw.remainder());
    for ((x, d), w) in cx.zip(cd).zip(cw) {
        for i in 0..LANES {
            lanes[i] += d[i] * (1.0 + w[i]) * x[i];
        }
    }
    let tail: f32 = rx
        .iter()
        .zip(rd)
        .zip(rw)
        .map(|((&x, &d), &w)| d * (1.0 + w) * x)
        .sum();
    lanes.iter().sum::<f32>() + tail
}

fn rows_per_chunk(n: usize) -> usize {
    (GRAIN / n).max(1)
}

pub(crate) fn forward(x: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let n = w.len();
    let rows = rows_per_chunk(n);
    let ([y, r], _) = par_outputs([x.len(), x.len() / n], [rows * n, rows], |i, [y, r]| {
        forward_rows(chunk(x, i, rows * n), w, eps, y, r)
    });
    (y, r)
}

/// `(∂x, ∂w)`; `∂w` sums the chunks' partial sums in chunk order, so the
/// result does not depend on the number of threads.
pub(crate) fn backward(x: &[f32], w: &[f32], r: &[f32], d: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let n = w.len();
    let rows = rows_per_chunk(n);
    let ([dx], partial) = par_outputs([x.len()], [rows * n], |i, [dx]| {
        let [x, d] = [x, d].map(|v| chunk(v, i, rows * n));
        let mut dw = vec![0f32; n];
        backward_rows(x, w, chunk(r, i, rows), d, dx, &mut dw);
        dw
    });
    let mut dw = vec![0f32; n];
    for p in partial {
        for (a, b) in dw.iter_mut().zip(p) {
            *a += b;
        }
    }
    (dx, dw)
}

#[derive(Debug, Clone)]
struct RmsNorm {
    eps: f32,
}

impl Fused<2> for RmsNorm {
    fn forward(&self, [x, w]: [FlexTensor; 2], tracked: bool) -> (FlexTensor, Option<Self::State>) {
        let (x, w) = (contiguous(x).expect("f32"), contiguous(w).expect("f32"));
        let shape = shape_of(&x);
        let (y, r) = forward(f32s(&x).unwrap(), f32s(&w).unwrap(), self.eps);
        (flex_tensor(y, &shape), tracked.then_some((x, w, r)))
    }
}

impl Backward<Flex, 2> for RmsNorm {
    /// `x`, `w` (as a row of x's rank) and each row's `r`.
    type State = (FlexTensor, FlexTensor, Vec<f32>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let d = contiguous(grads.consume::<Flex>(&ops.node)).expect("f32 gradient");
        let (x, w, r) = ops.state;
        let (dx, dw) = backward(f32s(&x).unwrap(), f32s(&w).unwrap(), &r, f32s(&d).unwrap());
        let [px, pw] = &ops.parents;
        if let Some(node) = px {
            grads.register::<Flex>(node.id, flex_tensor(dx, &shape_of(&x)));
        }
        if let Some(node) = pw {
            grads.register::<Flex>(node.id, flex_tensor(dw, &shape_of(&w)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{assert_close, random, value_and_grads};

    fn unfused(x: Tensor<3>, w: Tensor<1>) -> Tensor<3> {
        let rms = x
            .clone()
            .square()
            .mean_dim(2)
            .add_scalar(1e-6)
            .sqrt()
            .recip();
        x * rms * w.add_scalar(1.0).unsqueeze::<3>()
    }

    #[test]
    fn rms_norm_matches_the_unfused_expression_and_its_gradients() {
        // 2·600 rows of 48: several chunks, so ∂w sums partial sums
        let (x, w) = (random([2, 600, 48], 3.0, 3), random([48], 0.5, 4));
        let shape = |t: Tensor<3>| t.reshape([48]);
        let fused = value_and_grads([x.clone(), w.clone().reshape([1, 1, 48])], |[x, w]| {
            rms_norm(x, shape(w), 1e-6).unwrap_or_else(|_| panic!("flex takes the fused kernel"))
        });
        let reference = value_and_grads([x, w.reshape([1, 1, 48])], |[x, w]| unfused(x, shape(w)));
        assert_close(&fused, &reference, 1e-5);
    }

    #[test]
    fn by_hand() {
        // x = (3, 4): mean(x²) = 12.5, r = 1/√12.5; w = (0, 1)
        let r = 1.0 / 12.5f32.sqrt();
        let (y, rs) = forward(&[3.0, 4.0], &[0.0, 1.0], 0.0);
        assert!((rs[0] - r).abs() < 1e-7);
        assert!(
            (y[0] - 3.0 * r).abs() < 1e-6 && (y[1] - 8.0 * r).abs() < 1e-6,
            "{y:?}"
        );
        // ∂y = (1, 0): h = (1, 0), h·x = 3, ∂x = r·h − x·r³·3/2, ∂w = (3r, 0)
        let (dx, dw) = backward(&[3.0, 4.0], &[0.0, 1.0], &rs, &[1.0, 0.0]);
        let r3 = r * r * r;
        assert!((dx[0] - (r - 3.0 * r3 * 1.5)).abs() < 1e-6, "{dx:?}");
        assert!((dx[1] - (-4.0 * r3 * 1.5)).abs() < 1e-6, "{dx:?}");
        assert!((dw[0] - 3.0 * r).abs() < 1e-6 && dw[1] == 0.0, "{dw:?}");
    }
}
