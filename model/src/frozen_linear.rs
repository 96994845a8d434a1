//! `y = x · Wᵀ` for a frozen bf16 `W` under autodiff (the base of a LoRA
//! run held compact), with its own backward `∂x = ∂y · W`.
//!
//! Burn's matmul keeps both operands for the backward pass; with `W` cast to
//! f32 in the forward, that would hold an f32 copy of every frozen matrix
//! until the step's backward, which is the f32 model again. Here the
//! autodiff node keeps the bf16 `W` itself (a reference to the parameter's
//! storage, no copy) and both products convert `W` to f32 a block of rows
//! at a time. Only `flex` holds bf16 tensors (see
//! [`crate::checkpoint::compact_supported`]); elsewhere the caller takes
//! Burn's matmul.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, NoCheckpointing};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Flex};
use burn::tensor::{DType, Tensor};

/// Rows of `W` converted to f32 at once: a 256k-vocabulary head never
/// exists whole in f32.
pub(crate) const BLOCK_ELEMENTS: usize = 1 << 24;

/// `x · wᵀ` for an autodiff `x` `[m, k]` and a frozen 16-bit `w` `[n, k]`
/// on `flex`; `Err` gives the operands back on any other backend.
pub fn frozen_linear(x: Tensor<2>, w: Tensor<2>) -> Result<Tensor<2>, Box<(Tensor<2>, Tensor<2>)>> {
    frozen_linear_in_blocks(x, w, BLOCK_ELEMENTS)
}

fn frozen_linear_in_blocks(
    x: Tensor<2>,
    w: Tensor<2>,
    block_elements: usize,
) -> Result<Tensor<2>, Box<(Tensor<2>, Tensor<2>)>> {
    macro_rules! with_strategy {
        ($c:ty) => {
            if let (Ok(xa), Ok(wa)) = (
                x.clone().try_into_primitive::<Autodiff<Flex, $c>>(),
                w.clone().try_into_primitive::<Autodiff<Flex, $c>>(),
            ) {
                let (xp, guard) = xa.into_parts();
                let wp = wa.into_primitive();
                let out = match FrozenLinear
                    .prepare::<$c>([guard])
                    .compute_bound()
                    .stateful()
                {
                    OpsKind::Tracked(prep) => {
                        let y = forward(xp, &wp, block_elements);
                        prep.finish((wp, block_elements), y)
                    }
                    OpsKind::UnTracked(prep) => prep.finish(forward(xp, &wp, block_elements)),
                };
                return Ok(Tensor::from_primitive::<Autodiff<Flex, $c>>(out));
            }
        };
    }
    with_strategy!(NoCheckpointing);
    with_strategy!(BalancedCheckpointing);
    Err(Box::new((x, w)))
}

#[derive(Debug)]
struct FrozenLinear;

impl Backward<Flex, 1> for FrozenLinear {
    /// The frozen weight `[n, k]` as stored, and the block size.
    type State = (FlexTensor, usize);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (w, block_elements) = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
            backward(grad, &w, block_elements)
        });
    }
}

fn flex(t: FlexTensor) -> Tensor<2> {
    Tensor::from_primitive::<Flex>(t)
}

fn primitive(t: Tensor<2>) -> FlexTensor {
    t.try_into_primitive::<Flex>()
        .expect("a product of flex tensors stays on flex")
}

/// Rows `start..start + len` of `w` in f32: a contiguous bf16 `w` is
/// widened on all cores (a 16-bit shift per element), anything else by
/// Burn's cast.
fn block(w: &Tensor<2>, start: usize, len: usize) -> Tensor<2> {
    if let Some(wide) = widened_rows(w, start, len) {
        return wide;
    }
    let part = w.clone().narrow(0, start, len);
    if part.dtype() == DType::F32 {
        part
    } else {
        part.cast(DType::F32)
    }
}

fn widened_rows(w: &Tensor<2>, start: usize, len: usize) -> Option<Tensor<2>> {
    use rayon::prelude::*;
    let [_, k] = w.dims();
    let p = w.clone().try_into_primitive::<Flex>().ok()?;
    if p.dtype() != DType::BF16 || !p.is_contiguous() {
        return None;
    }
    let at = p.layout().start_offset() + start * k;
    let src = &p.storage::<half::bf16>()[at..at + len * k];
    let mut out = vec![0f32; len * k];
    out.par_chunks_mut(1 << 16)
        .zip(src.par_chunks(1 << 16))
        .for_each(|(o, s)| {
            for (o, s) in o.iter_mut().zip(s) {
                *o = f32::from_bits(u32::from(s.to_bits()) << 16);
            }
        });
    let data = burn::tensor::TensorData::new(out, [len, k]);
    Some(flex(FlexTensor::from_data(data)))
}

fn forward(x: FlexTensor, w: &FlexTensor, block_elements: usize) -> FlexTensor {
    primitive(product_in_blocks(flex(x), &flex(w.clone()), block_elements))
}

/// `y [m, n] = x [m, k] · wᵀ` for a 16-bit `w`, its rows in f32 a block of
/// `block_elements` at a time (outside autodiff too: frozen models).
pub(crate) fn product_in_blocks(x: Tensor<2>, w: &Tensor<2>, block_elements: usize) -> Tensor<2> {
    let [n, k] = w.dims();
    let rows = (block_elements / k.max(1)).max(1);
    let parts: Vec<Tensor<2>> = (0..n)
        .step_by(rows)
        .map(|start| {
            let b = block(w, start, rows.min(n - start));
            x.clone().matmul(b.transpose())
        })
        .collect();
    Tensor::cat(parts, 1)
}

/// `∂x [m, k] = ∂y [m, n] · w`, summed over blocks of `w`'s rows.
fn backward(grad: FlexTensor, w: &FlexTensor, block_elements: usize) -> FlexTensor {
    let (grad, w) = (flex(grad), flex(w.clone()));
    let [n, k] = w.dims();
    let rows = (block_elements / k.max(1)).max(1);
    let mut sum: Option<Tensor<2>> = None;
    for start in (0..n).step_by(rows) {
        let len = rows.min(n - start);
        let part = grad
            .clone()
            .narrow(1, start, len)
            .matmul(block(&w, start, len));
        sum = Some(match sum {
            Some(s) => s + part,
            None => part,
        });
    }
    primitive(sum.expect("a weight with rows"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Param;
    use burn::tensor::{Device, TensorData};

    fn values(t: Tensor<2>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    }

    /// The product and the input's gradient equal Burn's matmul with the
    /// weight widened to f32 beforehand, in one block and in blocks of 2
    /// rows (the last one short).
    #[test]
    fn matches_the_f32_product_and_its_gradient() {
        for block in [1 << 24, 10] {
            matches_the_f32_product_in_blocks_of(block);
        }
    }

    fn matches_the_f32_product_in_blocks_of(block: usize) {
        let device = Device::default().autodiff();
        let (m, k, n) = (3, 5, 5);
        let xs: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let ws: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
        let w16 = Tensor::<2>::from_data(TensorData::new(ws, [n, k]), &device).cast(DType::BF16);
        let w32 = w16.clone().cast(DType::F32);
        let x = Param::from_data(TensorData::new(xs, [m, k]), &device);
        let upstream = Tensor::<2>::from_data(
            TensorData::new(
                (0..m * n).map(|i| i as f32 - 4.0).collect::<Vec<_>>(),
                [m, n],
            ),
            &device,
        );

        let ours = frozen_linear_in_blocks(x.val(), w16, block).expect("flex");
        let grads = (ours.clone() * upstream.clone()).sum().backward();
        let g_ours = x.val().grad(&grads).unwrap();

        let reference = x.val().matmul(w32.transpose());
        let grads = (reference.clone() * upstream).sum().backward();
        let g_ref = x.val().grad(&grads).unwrap();

        for (a, b) in values(ours).iter().zip(values(reference)) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        let (g_ours, g_ref) = (
            g_ours.into_data().try_to_vec::<f32>().unwrap(),
            g_ref.into_data().try_to_vec::<f32>().unwrap(),
        );
        assert_eq!(g_ours.len(), m * k);
        for (a, b) in g_ours.iter().zip(&g_ref) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        assert!(g_ref.iter().any(|g| g.abs() > 0.1));
    }

    #[test]
    fn other_backends_get_the_operands_back() {
        // a tensor outside autodiff is not this op's
        let device = Device::default();
        let x = Tensor::<2>::zeros([1, 2], &device);
        let w = Tensor::<2>::zeros([2, 2], &device).cast(DType::BF16);
        assert!(frozen_linear(x, w).is_err());
    }
}
