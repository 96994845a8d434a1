//! `y = x · Wᵀ` for a frozen quantized `W` ([`crate::quant`]) with its own
//! backward `∂x = ∂y · W`; `W` takes no gradient.
//!
//! A few rows (a decoding step) go through the streaming kernel, which
//! reads the packed bytes and widens them in registers
//! ([`crate::skinny_matmul`]). More rows widen `W` a block of rows at a
//! time into f32 and multiply that block with gemm, forward and backward,
//! so a whole matrix never exists in f32; the autodiff node keeps only the
//! shared quantized matrix. On other backends (or with the fused kernels
//! off) the blocks go through Burn's matmul.

use burn::backend::Flex;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;

use crate::frozen_linear::BLOCK_ELEMENTS;
use crate::kernels::linear::strided_product;
use crate::kernels::{Fused, apply, contiguous, f32s, flex_tensor, plain};
use crate::quant::{QuantMatrix, SharedQuant};

/// `x [m, k] · qᵀ`.
pub fn quantized_linear(x: Tensor<2>, q: &SharedQuant) -> Tensor<2> {
    let [y] = quantized_linear_each(x, [q]);
    y
}

/// `x · qᵢᵀ` for each `qᵢ`: a decoding step's products in one streaming
/// pass (see [`crate::skinny_matmul::matmul_transposed_each`]).
pub fn quantized_linear_each<const N: usize>(
    x: Tensor<2>,
    qs: [&SharedQuant; N],
) -> [Tensor<2>; N] {
    let [m, k] = x.dims();
    if let Some(p) = plain(&x).and_then(contiguous)
        && let Some(outs) = crate::skinny_matmul::quantized_each(
            f32s(&p).expect("contiguous f32"),
            &qs.map(|q| q.as_ref()),
            m,
            k,
        )
    {
        let mut outs = outs.into_iter();
        return qs.map(|q| {
            let y = outs.next().expect("one output per matrix");
            Tensor::from_primitive::<Flex>(flex_tensor(y, &[m, q.rows]))
        });
    }
    qs.map(|q| match apply([x.clone()], QuantLinear(q.clone())) {
        Ok(y) => y,
        Err([x]) => in_blocks(x, q),
    })
}

/// Rows of `q` widened at once.
fn rows_per_block(q: &QuantMatrix) -> usize {
    (BLOCK_ELEMENTS / q.cols.max(1)).max(1)
}

/// Burn's matmul with `q`'s rows widened a block at a time on `x`'s device.
fn in_blocks(x: Tensor<2>, q: &QuantMatrix) -> Tensor<2> {
    let device = x.device();
    let step = rows_per_block(q);
    let parts: Vec<Tensor<2>> = (0..q.rows)
        .step_by(step)
        .map(|start| {
            let len = step.min(q.rows - start);
            let w = TensorData::new(q.rows_f32(start, len), [len, q.cols]);
            x.clone()
                .matmul(Tensor::<2>::from_data(w, &device).transpose())
        })
        .collect();
    Tensor::cat(parts, 1)
}

#[derive(Debug, Clone)]
struct QuantLinear(SharedQuant);

/// `x [m, k] · qᵀ` into a row-major `[m, n]`, `step` rows of `q` widened
/// at a time.
fn forward(x: &[f32], m: usize, q: &QuantMatrix, step: usize) -> Vec<f32> {
    let (n, k) = (q.rows, q.cols);
    let mut out = vec![0.0f32; m * n];
    for start in (0..n).step_by(step) {
        let len = step.min(n - start);
        let w = q.rows_f32(start, len);
        let part = strided_product([m, len, k], (x, k, 1), (&w, 1, k));
        out.par_chunks_mut(n)
            .zip(part.par_chunks(len))
            .for_each(|(o, p)| o[start..start + len].copy_from_slice(p));
    }
    out
}

/// `∂x [m, k] = ∂y [m, n] · q`, summed over blocks of `q`'s rows.
fn backward(dy: &[f32], m: usize, q: &QuantMatrix, step: usize) -> Vec<f32> {
    let (n, k) = (q.rows, q.cols);
    let mut dx: Option<Vec<f32>> = None;
    for start in (0..n).step_by(step) {
        let len = step.min(n - start);
        let w = q.rows_f32(start, len);
        let part = strided_product([m, k, len], (&dy[start..], n, 1), (&w, k, 1));
        match dx.as_mut() {
            None => dx = Some(part),
            Some(sum) => sum
                .par_chunks_mut(1 << 14)
                .zip(part.par_chunks(1 << 14))
                .for_each(|(s, p)| s.iter_mut().zip(p).for_each(|(s, p)| *s += p)),
        }
    }
    dx.unwrap_or_else(|| vec![0.0; m * k])
}

impl Fused<1> for QuantLinear {
    fn forward(&self, [x]: [FlexTensor; 1], tracked: bool) -> (FlexTensor, Option<Self::State>) {
        let x = contiguous(x).expect("f32");
        let m = x.layout().shape()[0];
        let y = forward(f32s(&x).expect("f32"), m, &self.0, rows_per_block(&self.0));
        (flex_tensor(y, &[m, self.0.rows]), tracked.then_some(m))
    }
}

impl Backward<Flex, 1> for QuantLinear {
    /// Rows of `x`.
    type State = usize;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = contiguous(grads.consume::<Flex>(&ops.node)).expect("f32 gradient");
        let m = ops.state;
        if let [Some(node)] = &ops.parents {
            let dx = backward(f32s(&dy).expect("f32"), m, &self.0, rows_per_block(&self.0));
            grads.register::<Flex>(node.id, flex_tensor(dx, &[m, self.0.cols]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::QuantFormat;
    use burn::module::Param;
    use burn::tensor::Device;
    use std::sync::Arc;

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919 + seed * 104_729) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    /// The product and the input's gradient equal a plain dequantize-then-
    /// matmul, for the streaming (few rows), gemm-block and Burn paths.
    #[test]
    fn equals_dequantize_then_matmul_forward_and_backward() {
        // k a multiple of the block (streaming applies) and not; rows from
        // one (decoding) to more than the streaming kernel takes
        for (m, k, n) in [(1, 128, 40), (5, 64, 130), (40, 192, 33), (7, 50, 9)] {
            for format in [QuantFormat::Int8, QuantFormat::Nf4] {
                let q = Arc::new(QuantMatrix::quantize(format, &values(n * k, 1), [n, k]));
                let w = q.dequantize();
                check(m, k, n, &q, &w);
                // blocks of 8 rows (the last one short)
                check_blocks(m, k, &q, &w, 8);
            }
        }
    }

    fn data(t: Tensor<2>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    }

    fn close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (x, y) in a.iter().zip(b) {
            assert!(
                (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                "{what}: {x} vs {y}"
            );
        }
    }

    fn check(m: usize, k: usize, n: usize, q: &SharedQuant, w: &[f32]) {
        let device = Device::default();
        let xs = values(m * k, 2);
        let x = Tensor::<2>::from_data(TensorData::new(xs.clone(), [m, k]), &device);
        let wt = Tensor::<2>::from_data(TensorData::new(w.to_vec(), [n, k]), &device);
        let want = data(x.clone().matmul(wt.clone().transpose()));
        close(&data(quantized_linear(x.clone(), q)), &want, "plain");
        close(&data(in_blocks(x, q)), &want, "Burn's blocks");

        let ad = device.autodiff();
        let x = Param::from_data(TensorData::new(xs, [m, k]), &ad);
        let up = Tensor::<2>::from_data(TensorData::new(values(m * n, 3), [m, n]), &ad);
        let ours = quantized_linear(x.val(), q);
        let grads = (ours.clone() * up.clone()).sum().backward();
        let g_ours = data(x.val().grad(&grads).unwrap());
        let wt = Tensor::<2>::from_data(TensorData::new(w.to_vec(), [n, k]), &ad);
        let reference = x.val().matmul(wt.transpose());
        let grads = (reference.clone() * up).sum().backward();
        let g_ref = data(x.val().grad(&grads).unwrap());
        close(&data(ours.inner()), &data(reference.inner()), "autodiff");
        close(&g_ours, &g_ref, "gradient");
        assert!(g_ref.iter().any(|g| g.abs() > 0.1));
    }

    fn check_blocks(m: usize, k: usize, q: &QuantMatrix, w: &[f32], step: usize) {
        let n = q.rows;
        let xs = values(m * k, 4);
        let whole = strided_product([m, n, k], (&xs, k, 1), (w, 1, k));
        close(&forward(&xs, m, q, step), &whole, "blocks");
        let dy = values(m * n, 5);
        let dx = strided_product([m, k, n], (&dy, n, 1), (w, k, 1));
        close(&backward(&dy, m, q, step), &dx, "backward blocks");
    }
}
