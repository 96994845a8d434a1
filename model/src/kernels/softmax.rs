//! Gemma 2's attention probabilities in one pass per row:
//! `p = softmax(cap·tanh(scale·s / cap) + bias)` (no cap: `scale·s`), with the
//! additive mask `bias` shared by every head.
//!
//! Backward with `c = cap·tanh(scale·s / cap)`:
//! `∂s = scale·(1 − (c/cap)²)·p ⊙ (∂p − ⟨∂p, p⟩)`.

use burn::backend::Flex;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::tensor::Tensor;

use super::exp::{exp, soft_cap};
use super::{
    Fused, GRAIN, apply, chunk, contiguous, f32s, flex_tensor, max_of, multiversion, par_outputs,
    shape_of, sum_pairs,
};

/// `scores` `[b, kv, g, t, s]` (query heads grouped by key/value head) and
/// `bias` `[1 or b, t, s]`, on flex; `Err` gives `scores` back elsewhere.
pub fn capped_softmax(
    scores: Tensor<5>,
    bias: &Tensor<3>,
    scale: f64,
    cap: Option<f64>,
) -> Result<Tensor<5>, Box<Tensor<5>>> {
    let [b, _, _, t, s] = scores.dims();
    let [mb, mt, ms] = bias.dims();
    if (mb != 1 && mb != b) || mt != t || ms != s {
        return Err(Box::new(scores));
    }
    let Some(bias) = super::plain(&bias.clone().inner()).and_then(super::contiguous) else {
        return Err(Box::new(scores));
    };
    let op = CappedSoftmax {
        bias,
        scale: scale as f32,
        cap: cap.map(|c| c as f32),
    };
    apply([scores], op).map_err(|[s]| Box::new(s))
}

/// Below this, `e^x` is 0 to f32 (and the bias's `f32::MIN` lands here).
const UNDERFLOW: f32 = -87.3;

multiversion! {
    fn forward_row(x: &[f32], bias: &[f32], scale: f32, cap: f32, p: &mut [f32]) {
        if cap > 0.0 {
            for ((p, &x), &b) in p.iter_mut().zip(x).zip(bias) {
                *p = soft_cap(scale * x, cap) + b;
            }
        } else {
            for ((p, &x), &b) in p.iter_mut().zip(x).zip(bias) {
                *p = scale * x + b;
            }
        }
        let max = max_of(p);
        for p in p.iter_mut() {
            let z = *p - max;
            *p = if z < UNDERFLOW { 0.0 } else { exp(z) };
        }
        let sum = sum_pairs(p, p, |a, _| a);
        let inv = 1.0 / sum;
        for p in p.iter_mut() {
            *p *= inv;
        }
    }
}

multiversion! {
    fn backward_row(x: &[f32], p: &[f32], d: &[f32], scale: f32, cap: f32, dx: &mut [f32]) {
        let dot = sum_pairs(p, d, |p, d| p * d);
        for i in 0..dx.len() {
            let slope = if cap > 0.0 {
                let c = soft_cap(scale * x[i], cap) / cap;
                scale * (1.0 - c * c)
            } else {
                scale
            };
            dx[i] = slope * p[i] * (d[i] - dot);
        }
    }
}

/// Rows of `s` per parallel task.
fn rows_per_task(s: usize) -> usize {
    (GRAIN / s.max(1)).max(1)
}

/// The bias row of score row `row` (`[b, heads, t]` rows of `[.., s]`).
fn bias_row(
    bias: &[f32],
    row: usize,
    heads_t: usize,
    t: usize,
    s: usize,
    per_batch: bool,
) -> &[f32] {
    let (bi, ti) = (row / heads_t, row % t);
    let at = (if per_batch { bi * t } else { 0 } + ti) * s;
    &bias[at..at + s]
}

#[derive(Debug, Clone)]
struct CappedSoftmax {
    /// `[1 or b, t, s]`, contiguous.
    bias: FlexTensor,
    scale: f32,
    /// Non-positive: no cap.
    cap: Option<f32>,
}

impl CappedSoftmax {
    fn geometry(&self, shape: &[usize]) -> (usize, usize, usize, bool) {
        let [_, kv, g, t, s] = shape[..] else {
            unreachable!("scores are [b, kv, g, t, s]")
        };
        let mb = self.bias.layout().shape()[0];
        (kv * g * t, t, s, mb > 1)
    }
}

impl Fused<1> for CappedSoftmax {
    fn forward(&self, [x]: [FlexTensor; 1], tracked: bool) -> (FlexTensor, Option<Self::State>) {
        let x = contiguous(x).expect("f32");
        let shape = shape_of(&x);
        let (heads_t, t, s, per_batch) = self.geometry(&shape);
        let (xs, bias) = (f32s(&x).unwrap(), f32s(&self.bias).unwrap());
        let cap = self.cap.unwrap_or(0.0);
        let rows = rows_per_task(s);
        let ([p], _) = par_outputs([xs.len()], [rows * s], |task, [p]| {
            let x = chunk(xs, task, rows * s);
            for (i, (p, x)) in p.chunks_exact_mut(s).zip(x.chunks_exact(s)).enumerate() {
                let b = bias_row(bias, task * rows + i, heads_t, t, s, per_batch);
                forward_row(x, b, self.scale, cap, p);
            }
        });
        let p = flex_tensor(p, &shape);
        let state = tracked.then(|| (x, p.clone()));
        (p, state)
    }
}

impl Backward<Flex, 1> for CappedSoftmax {
    /// The scores and the probabilities.
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let d = contiguous(grads.consume::<Flex>(&ops.node)).expect("f32 gradient");
        let [parent] = &ops.parents;
        let Some(node) = parent else { return };
        let (x, p) = ops.state;
        let shape = shape_of(&x);
        let s = shape[4];
        let cap = self.cap.unwrap_or(0.0);
        let (xs, ps, ds) = (f32s(&x).unwrap(), f32s(&p).unwrap(), f32s(&d).unwrap());
        let rows = rows_per_task(s);
        let ([dx], _) = par_outputs([xs.len()], [rows * s], |task, [dx]| {
            let [x, p, d] = [xs, ps, ds].map(|v| chunk(v, task, rows * s));
            for (((dx, x), p), d) in dx
                .chunks_exact_mut(s)
                .zip(x.chunks_exact(s))
                .zip(p.chunks_exact(s))
                .zip(d.chunks_exact(s))
            {
                backward_row(x, p, d, self.scale, cap, dx);
            }
        });
        grads.register::<Flex>(node.id, flex_tensor(dx, &shape));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{assert_close, random, value_and_grads};
    use crate::layers::soft_cap_unfused as soft_cap_tensor;
    use burn::tensor::{Device, TensorData};

    /// A causal bias `[b, t, s]` with the first `pad[i]` keys of row `i` masked.
    fn bias(b: usize, t: usize, pad: &[usize]) -> Tensor<3> {
        let mut v = vec![0f32; b * t * t];
        for bi in 0..b {
            for q in 0..t {
                for k in 0..t {
                    if k > q || k < pad[bi] {
                        v[(bi * t + q) * t + k] = f32::MIN;
                    }
                }
            }
        }
        Tensor::from_data(TensorData::new(v, [b, t, t]), &Device::default())
    }

    fn unfused(x: Tensor<5>, bias: &Tensor<3>, scale: f64, cap: Option<f64>) -> Tensor<5> {
        let [mb, t, s] = bias.dims();
        let z = soft_cap_tensor(x.mul_scalar(scale), cap) + bias.clone().reshape([mb, 1, 1, t, s]);
        burn::tensor::activation::softmax(z, 4)
    }

    #[test]
    fn matches_the_unfused_expression_and_its_gradients() {
        for (cap, mb) in [(Some(50.0), 2), (None, 1), (Some(5.0), 2)] {
            let x = random([2, 2, 3, 40, 40], 30.0, 5);
            let bias = bias(mb, 40, &[0, 7][..mb]);
            let fused = value_and_grads([x.clone()], |[x]| {
                capped_softmax(x, &bias, 0.125, cap)
                    .unwrap_or_else(|_| panic!("flex takes the fused kernel"))
            });
            let reference = value_and_grads([x], |[x]| unfused(x, &bias, 0.125, cap));
            assert_close(&fused, &reference, 2e-6);
        }
    }

    #[test]
    fn by_hand() {
        // scores (0, ln 3 / scale), no cap, second key masked then not
        let (scale, x) = (0.5f32, [0.0, 2.0 * 3f32.ln()]);
        let mut p = [0f32; 2];
        forward_row(&x, &[0.0, f32::MIN], scale, 0.0, &mut p);
        assert_eq!(p, [1.0, 0.0]);
        forward_row(&x, &[0.0, 0.0], scale, 0.0, &mut p);
        assert!(
            (p[0] - 0.25).abs() < 1e-7 && (p[1] - 0.75).abs() < 1e-7,
            "{p:?}"
        );
        // ∂p = (1, 0): ⟨∂p, p⟩ = 0.25, ∂s = 0.5·p·(∂p − 0.25) = (0.09375, −0.09375)
        let mut dx = [0f32; 2];
        backward_row(&x, &p, &[1.0, 0.0], scale, 0.0, &mut dx);
        assert!(
            (dx[0] - 0.093_75).abs() < 1e-7 && (dx[1] + 0.093_75).abs() < 1e-7,
            "{dx:?}"
        );
    }
}
