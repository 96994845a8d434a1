//! `y = gelu_tanh(g) · u`, Gemma's gated MLP activation, in one pass.
//!
//! `gelu_tanh(x) = x·σ(z)`, `z = 2√(2/π)(x + 0.044715x³)` (the same function
//! as `½x(1 + tanh(z/2))`). Backward: `∂u = ∂y·gelu(g)`,
//! `∂g = ∂y·u·(σ + x·σ(1 − σ)·z′)`, `z′ = 2√(2/π)(1 + 3·0.044715x²)`.

use burn::backend::Flex;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::tensor::Tensor;

use super::exp::sigmoid;
use super::{
    Fused, GRAIN, apply, chunk, contiguous, f32s, flex_tensor, multiversion, par_outputs, shape_of,
};

const C: f32 = 2.0 * 0.797_884_6;
const A: f32 = 0.044_715;

/// `gelu_tanh(gate) · up` on flex; `Err` gives the operands back elsewhere.
pub fn geglu<const D: usize>(
    gate: Tensor<D>,
    up: Tensor<D>,
) -> Result<Tensor<D>, Box<[Tensor<D>; 2]>> {
    if gate.dims() != up.dims() {
        return Err(Box::new([gate, up]));
    }
    apply([gate, up], Geglu).map_err(Box::new)
}

multiversion! {
    fn forward_rows(g: &[f32], u: &[f32], y: &mut [f32]) {
        for ((y, &x), &u) in y.iter_mut().zip(g).zip(u) {
            let s = sigmoid(C * x * (1.0 + A * x * x));
            *y = x * s * u;
        }
    }
}

multiversion! {
    fn backward_rows(g: &[f32], u: &[f32], d: &[f32], dg: &mut [f32], du: &mut [f32]) {
        for i in 0..dg.len() {
            let x = g[i];
            let s = sigmoid(C * x * (1.0 + A * x * x));
            let slope = s + x * s * (1.0 - s) * C * (1.0 + 3.0 * A * x * x);
            du[i] = d[i] * x * s;
            dg[i] = d[i] * u[i] * slope;
        }
    }
}

pub(crate) fn forward(g: &[f32], u: &[f32]) -> Vec<f32> {
    let ([y], _) = par_outputs([g.len()], [GRAIN], |i, [y]| {
        forward_rows(chunk(g, i, GRAIN), chunk(u, i, GRAIN), y)
    });
    y
}

pub(crate) fn backward(g: &[f32], u: &[f32], d: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let ([dg, du], _) = par_outputs([g.len(); 2], [GRAIN; 2], |i, [dg, du]| {
        let [g, u, d] = [g, u, d].map(|x| chunk(x, i, GRAIN));
        backward_rows(g, u, d, dg, du)
    });
    (dg, du)
}

#[derive(Debug, Clone)]
struct Geglu;

impl Fused<2> for Geglu {
    fn forward(&self, [g, u]: [FlexTensor; 2], tracked: bool) -> (FlexTensor, Option<Self::State>) {
        let (g, u) = (contiguous(g).expect("f32"), contiguous(u).expect("f32"));
        let shape = shape_of(&g);
        let y = forward(f32s(&g).expect("f32"), f32s(&u).expect("f32"));
        (flex_tensor(y, &shape), tracked.then_some((g, u)))
    }
}

impl Backward<Flex, 2> for Geglu {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let d = contiguous(grads.consume::<Flex>(&ops.node)).expect("f32 gradient");
        let (g, u) = ops.state;
        let shape = shape_of(&g);
        let (dg, du) = backward(f32s(&g).unwrap(), f32s(&u).unwrap(), f32s(&d).unwrap());
        let [pg, pu] = &ops.parents;
        if let Some(node) = pg {
            grads.register::<Flex>(node.id, flex_tensor(dg, &shape));
        }
        if let Some(node) = pu {
            grads.register::<Flex>(node.id, flex_tensor(du, &shape));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{assert_close, random, value_and_grads};
    use crate::layers::gelu_tanh;

    #[test]
    fn geglu_matches_the_unfused_expression_and_its_gradients() {
        // 3·5·2000 elements: several chunks of the parallel split
        let (g, u) = (random([3, 5, 2000], 4.0, 1), random([3, 5, 2000], 1.0, 2));
        let fused = value_and_grads([g.clone(), u.clone()], |[g, u]| {
            geglu(g, u).unwrap_or_else(|_| panic!("flex takes the fused kernel"))
        });
        let unfused = value_and_grads([g, u], |[g, u]| gelu_tanh(g) * u);
        assert_close(&fused, &unfused, 2e-6);
    }

    #[test]
    fn gradient_by_hand() {
        // x = 1: z = 2c(1.044715), gelu(1) = σ(z) = 0.841192,
        // gelu'(1) = σ + σ(1 − σ)·2c(1.134145) = 1.082964
        let (g, u) = ([1.0f32], [2.0f32]);
        let y = forward(&g, &u);
        assert!((y[0] - 2.0 * 0.841_192).abs() < 2e-6, "{y:?}");
        let (dg, du) = backward(&g, &u, &[1.0]);
        assert!((du[0] - 0.841_192).abs() < 2e-6, "{du:?}");
        assert!((dg[0] - 2.0 * 1.082_964).abs() < 4e-6, "{dg:?}");
    }
}
