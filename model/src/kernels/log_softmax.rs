//! `log_softmax` over the last axis and the soft-cap `cap·tanh(x/cap)`, one
//! pass each way (the LM head's losses and log-probs).
//!
//! `y = x − m − ln Σ e^{x−m}` (`m` the row's max); backward
//! `∂x = ∂y − e^y·Σ∂y`. Soft-cap: `y = cap − 2cap/(e^{2x/cap} + 1)`,
//! `∂x = ∂y·(1 − (y/cap)²)`.

use burn::backend::Flex;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::tensor::Tensor;

use super::exp::{exp, soft_cap as cap_one};
use super::{
    Fused, GRAIN, apply, chunk, contiguous, f32s, flex_tensor, max_of, multiversion, par_outputs,
    shape_of, sum_pairs,
};

/// Below this, `e^x` is 0 to f32.
const UNDERFLOW: f32 = -87.3;

/// `log_softmax` over the last axis on flex; Burn's elsewhere.
pub fn log_softmax<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    apply([x], OutputOp(LogSoftmax))
        .unwrap_or_else(|[x]| burn::tensor::activation::log_softmax(x, D - 1))
}

/// `cap·tanh(x/cap)` on flex; `Err` gives `x` back elsewhere.
pub fn soft_cap<const D: usize>(x: Tensor<D>, cap: f64) -> Result<Tensor<D>, Box<Tensor<D>>> {
    apply([x], OutputOp(SoftCap { cap: cap as f32 })).map_err(|[x]| Box::new(x))
}

multiversion! {
    fn log_softmax_row(x: &[f32], y: &mut [f32]) {
        let max = max_of(x);
        for (y, &x) in y.iter_mut().zip(x) {
            let z = x - max;
            *y = if z < UNDERFLOW { 0.0 } else { exp(z) };
        }
        let lse = max + sum_pairs(y, y, |a, _| a).ln();
        for (y, &x) in y.iter_mut().zip(x) {
            *y = x - lse;
        }
    }
}

multiversion! {
    fn log_softmax_back(y: &[f32], d: &[f32], dx: &mut [f32]) {
        let total = sum_pairs(d, d, |a, _| a);
        for ((dx, &y), &d) in dx.iter_mut().zip(y).zip(d) {
            let p = if y < UNDERFLOW { 0.0 } else { exp(y) };
            *dx = d - p * total;
        }
    }
}

multiversion! {
    fn cap_chunk(x: &[f32], cap: f32, y: &mut [f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = cap_one(x, cap);
        }
    }
}

multiversion! {
    fn cap_back(y: &[f32], d: &[f32], cap: f32, dx: &mut [f32]) {
        for ((dx, &y), &d) in dx.iter_mut().zip(y).zip(d) {
            let c = y / cap;
            *dx = d * (1.0 - c * c);
        }
    }
}

/// Rows of `n` at a time per task (whole rows for the row-wise passes; a
/// length that is not a multiple of `n` ends in one shorter row).
fn per_task(n: usize) -> usize {
    (GRAIN / n.max(1)).max(1) * n.max(1)
}

fn rows_map(x: &[f32], n: usize, f: impl Fn(&[f32], &mut [f32]) + Sync) -> Vec<f32> {
    let task = per_task(n);
    let ([y], _) = par_outputs([x.len()], [task], |i, [y]| {
        for (y, x) in y.chunks_mut(n).zip(chunk(x, i, task).chunks(n)) {
            f(x, y);
        }
    });
    y
}

fn rows_zip(
    a: &[f32],
    b: &[f32],
    n: usize,
    f: impl Fn(&[f32], &[f32], &mut [f32]) + Sync,
) -> Vec<f32> {
    let task = per_task(n);
    let ([y], _) = par_outputs([a.len()], [task], |i, [y]| {
        let (a, b) = (chunk(a, i, task), chunk(b, i, task));
        for ((y, a), b) in y.chunks_mut(n).zip(a.chunks(n)).zip(b.chunks(n)) {
            f(a, b, y);
        }
    });
    y
}

/// A unary op whose backward needs only its output: `∂x = g(y, ∂y)`,
/// over rows of the last axis (`n`).
trait FromOutput: Clone + std::fmt::Debug + Send + 'static {
    fn forward(&self, x: &[f32], n: usize) -> Vec<f32>;
    fn backward(&self, y: &[f32], d: &[f32], n: usize) -> Vec<f32>;
}

#[derive(Debug, Clone)]
struct OutputOp<K>(K);

impl<K: FromOutput> Fused<1> for OutputOp<K> {
    fn forward(&self, [x]: [FlexTensor; 1], tracked: bool) -> (FlexTensor, Option<Self::State>) {
        let x = contiguous(x).expect("f32");
        let shape = shape_of(&x);
        let n = *shape.last().expect("a last axis");
        let y = flex_tensor(self.0.forward(f32s(&x).unwrap(), n), &shape);
        let state = tracked.then(|| y.clone());
        (y, state)
    }
}

impl<K: FromOutput> Backward<Flex, 1> for OutputOp<K> {
    /// The output.
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let d = contiguous(grads.consume::<Flex>(&ops.node)).expect("f32 gradient");
        let [parent] = &ops.parents;
        let Some(node) = parent else { return };
        let y = ops.state;
        let shape = shape_of(&y);
        let n = *shape.last().expect("a last axis");
        let dx = self.0.backward(f32s(&y).unwrap(), f32s(&d).unwrap(), n);
        grads.register::<Flex>(node.id, flex_tensor(dx, &shape));
    }
}

#[derive(Debug, Clone)]
struct LogSoftmax;

impl FromOutput for LogSoftmax {
    fn forward(&self, x: &[f32], n: usize) -> Vec<f32> {
        rows_map(x, n, log_softmax_row)
    }

    fn backward(&self, y: &[f32], d: &[f32], n: usize) -> Vec<f32> {
        rows_zip(y, d, n, log_softmax_back)
    }
}

#[derive(Debug, Clone)]
struct SoftCap {
    cap: f32,
}

/// Element-wise ops need no whole rows.
impl FromOutput for SoftCap {
    fn forward(&self, x: &[f32], _: usize) -> Vec<f32> {
        rows_map(x, GRAIN.min(x.len()).max(1), |x, y| {
            cap_chunk(x, self.cap, y)
        })
    }

    fn backward(&self, y: &[f32], d: &[f32], _: usize) -> Vec<f32> {
        rows_zip(y, d, GRAIN.min(y.len()).max(1), |y, d, dx| {
            cap_back(y, d, self.cap, dx)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{assert_close, random, value_and_grads};

    #[test]
    fn log_softmax_matches_burn_and_its_gradient() {
        // 3·7 rows of 2,000: several rows per task and a partial last task
        let x = random([3, 7, 2000], 6.0, 11);
        let fused = value_and_grads([x.clone()], |[x]| log_softmax(x));
        let reference = value_and_grads([x], |[x]| burn::tensor::activation::log_softmax(x, 2));
        // ∂x = ∂y − p·Σ∂y: the row sums add 2,000 terms in another order
        assert_close(&fused, &reference, 1e-5);
    }

    #[test]
    fn soft_cap_matches_the_unfused_form_and_its_gradient() {
        // 40,001 elements: a partial last chunk
        let x = random([40_001], 40.0, 12);
        let fused = value_and_grads([x.clone()], |[x]| {
            soft_cap(x, 30.0).unwrap_or_else(|_| panic!("flex takes the fused kernel"))
        });
        let reference = value_and_grads([x], |[x]| crate::layers::soft_cap_unfused(x, Some(30.0)));
        // `cap − 2cap/(e^{2x/cap} + 1)` rounds at the scale of the cap (30·2⁻²⁴ per
        // operation) in both forms, so small outputs agree to ~1e-5 relative
        assert_close(&fused, &reference, 1e-5);
    }

    #[test]
    fn by_hand() {
        // log_softmax(0, ln 3) = (ln ¼, ln ¾); ∂y = (1, 0): ∂x = (1 − ¼, −¾)
        let mut y = [0f32; 2];
        log_softmax_row(&[0.0, 3f32.ln()], &mut y);
        assert!(
            (y[0] - 0.25f32.ln()).abs() < 1e-6 && (y[1] - 0.75f32.ln()).abs() < 1e-6,
            "{y:?}"
        );
        let mut dx = [0f32; 2];
        log_softmax_back(&y, &[1.0, 0.0], &mut dx);
        assert!(
            (dx[0] - 0.75).abs() < 1e-6 && (dx[1] + 0.75).abs() < 1e-6,
            "{dx:?}"
        );
        // soft-cap 30 at 15: 30·tanh(½) = 13.86352, slope 1 − tanh²(½) = 0.786448
        let mut c = [0f32; 1];
        cap_chunk(&[15.0], 30.0, &mut c);
        assert!((c[0] - 13.863_52).abs() < 1e-4, "{c:?}");
        let mut g = [0f32; 1];
        cap_back(&c, &[1.0], 30.0, &mut g);
        assert!((g[0] - 0.786_448).abs() < 1e-5, "{g:?}");
    }
}
