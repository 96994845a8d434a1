//! Rotary position embedding on flex in one pass each way:
//! `y = x·cos + rotate_half(x)·sin` with `rotate_half(x) = [−x₂, x₁]`, and
//! `∂x = ∂y·cos + rotate_halfᵀ(∂y·sin)`, `rotate_halfᵀ(v) = [v₂, −v₁]`.
//!
//! Burn's expression is two slices, a negation, a concatenation, two
//! products and a sum forward — each a single-threaded pass that allocates
//! — and backward the slices' zero-filled gradients besides. Here `x` is
//! read through its strides (heads split from a projection are a view),
//! `y` comes out contiguous and `∂x` in `x`'s own dimension order. Products
//! and sums are the unfused expression's, rounded the same way, so both
//! give the same bits.

use burn::backend::Flex;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::tensor::{DType, Tensor};

use super::{
    Fused, GRAIN, apply, axis_order, contiguous, dense_strides, dims, f32s, laid_out, multiversion,
    par_outputs,
};

/// `x [b, h, t, d] · cos + rotate_half(x) · sin` for tables `[b or 1, 1, t, d]`;
/// `Err` gives `x` back where the kernel does not apply.
pub fn rope(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Result<Tensor<4>, Box<Tensor<4>>> {
    let [b, _, t, d] = x.dims();
    let [cb, ch, ct, cd] = cos.dims();
    if (cb != 1 && cb != b)
        || ch != 1
        || ct != t
        || cd != d
        || d % 2 != 0
        || sin.dims() != cos.dims()
    {
        return Err(Box::new(x));
    }
    let table = |t: &Tensor<4>| super::plain(&t.clone().inner()).and_then(contiguous);
    let (Some(cos), Some(sin)) = (table(cos), table(sin)) else {
        return Err(Box::new(x));
    };
    apply([x], Rope { cos, sin }).map_err(|[x]| Box::new(x))
}

multiversion! {
    fn forward_row(x: &[f32], cos: &[f32], sin: &[f32], y: &mut [f32]) {
        let half = y.len() / 2;
        for i in 0..half {
            y[i] = x[i] * cos[i] + -x[i + half] * sin[i];
            y[i + half] = x[i + half] * cos[i + half] + x[i] * sin[i + half];
        }
    }
}

multiversion! {
    fn backward_row(d: &[f32], cos: &[f32], sin: &[f32], dx: &mut [f32]) {
        let half = dx.len() / 2;
        for i in 0..half {
            dx[i] = d[i] * cos[i] + d[i + half] * sin[i + half];
            dx[i + half] = d[i + half] * cos[i + half] + -(d[i] * sin[i]);
        }
    }
}

/// A `[b, h, t, d]` operand with unit stride along `d`, read row by row.
struct Rows<'a> {
    data: &'a [f32],
    at: usize,
    strides: [usize; 3],
}

impl<'a> Rows<'a> {
    fn of(t: &'a FlexTensor) -> Option<Self> {
        let layout = t.layout();
        let s = layout.strides();
        if t.dtype() != DType::F32 || s.iter().any(|&x| x < 0) || s[3] != 1 {
            return None;
        }
        Some(Self {
            data: t.storage::<f32>(),
            at: layout.start_offset(),
            strides: [s[0] as usize, s[1] as usize, s[2] as usize],
        })
    }

    fn row(&self, [b, h, t]: [usize; 3], d: usize) -> &[f32] {
        let at = self.at + b * self.strides[0] + h * self.strides[1] + t * self.strides[2];
        &self.data[at..at + d]
    }
}

fn readable(t: FlexTensor) -> FlexTensor {
    if Rows::of(&t).is_some() {
        t
    } else {
        contiguous(t).expect("f32")
    }
}

#[derive(Debug, Clone)]
struct Rope {
    cos: FlexTensor,
    sin: FlexTensor,
}

impl Rope {
    /// `f(row index [b, h, t], table row offset, out row)` over every row of
    /// a fresh `shape` tensor laid out in `order` (axes outermost first,
    /// `d` innermost).
    fn map(
        &self,
        shape: [usize; 4],
        order: [usize; 3],
        f: impl Fn([usize; 3], usize, &mut [f32]) + Sync,
    ) -> FlexTensor {
        let [b, h, t, d] = shape;
        let per_batch = self.cos.layout().shape()[0] > 1;
        let rows = (GRAIN / d.max(1)).max(1);
        let ([y], _) = par_outputs([b * h * t * d], [rows * d], |task, [y]| {
            for (i, y) in y.chunks_exact_mut(d).enumerate() {
                let mut r = task * rows + i;
                let mut idx = [0usize; 3];
                for &axis in order.iter().rev() {
                    let n = [b, h, t][axis];
                    idx[axis] = r % n;
                    r /= n;
                }
                let table = ((if per_batch { idx[0] } else { 0 }) * t + idx[2]) * d;
                f(idx, table, y);
            }
        });
        let strides = dense_strides(shape, [order[0], order[1], order[2], 3]);
        laid_out(y, &shape, &strides)
    }

    fn tables(&self) -> (&[f32], &[f32]) {
        (f32s(&self.cos).unwrap(), f32s(&self.sin).unwrap())
    }
}

/// The order of `t`'s first three axes in memory, outermost first.
fn order_of(t: &FlexTensor) -> [usize; 3] {
    axis_order(t.layout().shape(), t.layout().strides())
}

impl Fused<1> for Rope {
    fn forward(&self, [x]: [FlexTensor; 1], tracked: bool) -> (FlexTensor, Option<Self::State>) {
        let x = readable(x);
        let shape = dims(&x);
        let d = shape[3];
        let order = order_of(&x);
        let rows = Rows::of(&x).unwrap();
        let (cos, sin) = self.tables();
        let y = self.map(shape, [0, 1, 2], |idx, at, y| {
            forward_row(rows.row(idx, d), &cos[at..at + d], &sin[at..at + d], y)
        });
        (y, tracked.then_some((shape, order)))
    }
}

impl Backward<Flex, 1> for Rope {
    /// `x`'s shape and axis order.
    type State = ([usize; 4], [usize; 3]);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = readable(grads.consume::<Flex>(&ops.node));
        let [parent] = &ops.parents;
        let Some(node) = parent else { return };
        let (shape, order) = ops.state;
        let d = shape[3];
        let rows = Rows::of(&dy).unwrap();
        let (cos, sin) = self.tables();
        let dx = self.map(shape, order, |idx, at, dx| {
            backward_row(rows.row(idx, d), &cos[at..at + d], &sin[at..at + d], dx)
        });
        grads.register::<Flex>(node.id, dx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{random, value_and_grads};

    fn unfused(x: Tensor<4>, cos: Tensor<4>, sin: Tensor<4>) -> Tensor<4> {
        let half = x.dims()[3] / 2;
        let x1 = x.clone().narrow(3, 0, half);
        let x2 = x.clone().narrow(3, half, half);
        x * cos + Tensor::cat(vec![x2.neg(), x1], 3) * sin
    }

    #[test]
    fn the_unfused_expressions_bits_forward_and_backward() {
        // heads split from a projection [b, t, h, d] (a strided view), with
        // per-row tables and with one table for the batch
        let (b, t, h, d) = (3, 5, 4, 8);
        for tb in [b, 1] {
            let (cos, sin) = (random([tb, 1, t, d], 1.0, 1), random([tb, 1, t, d], 1.0, 2));
            let x = random([b, t, h, d], 1.0, 3);
            let ours = value_and_grads([x.clone()], |[x]| {
                rope(x.swap_dims(1, 2), &cos, &sin).unwrap_or_else(|_| panic!("flex"))
            });
            let burn = value_and_grads([x], |[x]| {
                unfused(x.swap_dims(1, 2), cos.clone(), sin.clone())
            });
            assert_eq!(ours, burn, "tables for {tb} rows");
        }
    }

    #[test]
    fn the_input_gradient_keeps_the_inputs_order() {
        let (cos, sin) = (random([2, 1, 3, 4], 1.0, 4), random([2, 1, 3, 4], 1.0, 5));
        let x = random([2, 3, 5, 4], 1.0, 6).autodiff().require_grad();
        let y = rope(x.clone().swap_dims(1, 2), &cos, &sin).unwrap_or_else(|_| panic!("flex"));
        let grads = y.sum().backward();
        let dx = x
            .grad(&grads)
            .unwrap()
            .try_into_primitive::<Flex>()
            .unwrap();
        assert_eq!(dx.layout().strides(), [60, 20, 4, 1]);
    }
}
