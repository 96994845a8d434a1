//! Batched products `c = a·b` of `a [B₁, B₂, m, k]` and `b [B₁, B₂, k, n]` on
//! flex (attention's `q·kᵀ` and `p·v`), with their own backward:
//! `∂a = ∂c·bᵀ`, `∂b = aᵀ·∂c`.
//!
//! Each matrix is one gemm call that reads its operands through their
//! strides (a transposed or head-split view is not copied first) and writes
//! a buffer that is not zeroed first; the matrices of a batch run on all
//! cores at once. Each gradient comes out in its operand's own dimension
//! order (the gradient of `kᵀ` is laid out as `k`), so the view ops'
//! backward passes do not copy it either.

use burn::backend::Flex;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::tensor::{DType, Tensor};
use rayon::prelude::*;

use super::linear::{Strided, write_product};
use super::{Fused, apply, axis_order, contiguous, dense_strides, dims, laid_out};

/// Matrices with at least this many multiply-adds are split over the cores
/// one at a time; smaller ones run one per core.
const PARALLEL_MIN: usize = 192 * 192 * 192;

/// `a · b` over the last two axes for f32 flex operands (plain or autodiff)
/// with the same batch axes; `Err` gives the operands back elsewhere.
pub fn matmul(a: Tensor<4>, b: Tensor<4>) -> Result<Tensor<4>, Box<[Tensor<4>; 2]>> {
    let ([b1, b2, _, k], [c1, c2, kb, _]) = (a.dims(), b.dims());
    if (b1, b2, k) != (c1, c2, kb) {
        return Err(Box::new([a, b]));
    }
    apply([a, b], BatchedMatmul).map_err(Box::new)
}

/// An operand as gemm reads it: its storage, the offset of each matrix of
/// the batch, and the strides between rows and between columns.
struct Operand<'a> {
    data: &'a [f32],
    at: usize,
    batch: [isize; 2],
    rs: isize,
    cs: isize,
}

impl<'a> Operand<'a> {
    /// `None` for a negative stride (a flipped view).
    fn of(t: &'a FlexTensor) -> Option<Self> {
        let layout = t.layout();
        let s = layout.strides();
        if s.iter().any(|&x| x < 0) || t.dtype() != DType::F32 {
            return None;
        }
        let data = t.storage::<f32>();
        let last: isize = layout
            .shape()
            .iter()
            .zip(s)
            .map(|(&n, &st)| (n.max(1) as isize - 1) * st)
            .sum();
        let at = layout.start_offset();
        (layout.num_elements() == 0 || at + (last as usize) < data.len()).then_some(Self {
            data,
            at,
            batch: [s[0], s[1]],
            rs: s[2],
            cs: s[3],
        })
    }

    fn transposed(self) -> Self {
        Self {
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    fn matrix(&self, i: usize, j: usize) -> Strided {
        let at = self.at as isize + i as isize * self.batch[0] + j as isize * self.batch[1];
        Strided {
            ptr: self.data[at as usize..].as_ptr(),
            rs: self.rs,
            cs: self.cs,
        }
    }
}

/// A fresh buffer for `[B₁, B₂, rows, cols]` laid out densely in the
/// dimension order of `like` (a view's order, or row-major).
struct Output {
    values: Vec<f32>,
    shape: [usize; 4],
    strides: [isize; 4],
}

impl Output {
    fn new(shape: [usize; 4], like: Option<&[isize]>) -> Self {
        let order = like.map_or([0, 1, 2, 3], |s| axis_order(&shape, s));
        Self {
            values: Vec::with_capacity(shape.iter().product()),
            shape,
            strides: dense_strides(shape, order),
        }
    }

    /// Fills every matrix with `lhs(i, j) · rhs(i, j)`.
    fn fill(mut self, k: usize, lhs: &Operand, rhs: &Operand) -> FlexTensor {
        let [b1, b2, m, n] = self.shape;
        let base = self.values.as_mut_ptr() as usize;
        let strides = self.strides;
        let one = |idx: usize, parallelism| {
            let (i, j) = (idx / b2, idx % b2);
            let at = i as isize * strides[0] + j as isize * strides[1];
            // SAFETY: the output layout is a dense permutation of `shape`
            // within the buffer's capacity, so each matrix writes its own
            // elements; gemm writes each of them once without reading them
            // (`read_dst` false); the operands' extents were checked in
            // `Operand::of`.
            unsafe {
                write_product(
                    [m, n, k],
                    (base as *mut f32).offset(at),
                    [strides[2], strides[3]],
                    lhs.matrix(i, j),
                    rhs.matrix(i, j),
                    parallelism,
                )
            }
        };
        let count = b1 * b2;
        if k == 0 {
            self.values.resize(count * m * n, 0.0);
        } else {
            if m.saturating_mul(n).saturating_mul(k) >= PARALLEL_MIN || count == 1 {
                (0..count).for_each(|idx| one(idx, gemm::Parallelism::Rayon(0)));
            } else {
                (0..count)
                    .into_par_iter()
                    .for_each(|idx| one(idx, gemm::Parallelism::None));
            }
            // SAFETY: every element was written by one gemm call above.
            unsafe { self.values.set_len(count * m * n) };
        }
        laid_out(self.values, &self.shape, &self.strides)
    }
}

/// The operand itself when gemm can read it in place, else a contiguous copy.
fn readable(t: FlexTensor) -> FlexTensor {
    if Operand::of(&t).is_some() {
        t
    } else {
        contiguous(t).expect("f32")
    }
}

#[derive(Debug, Clone)]
struct BatchedMatmul;

impl Fused<2> for BatchedMatmul {
    fn forward(&self, [a, b]: [FlexTensor; 2], tracked: bool) -> (FlexTensor, Option<Self::State>) {
        let (a, b) = (readable(a), readable(b));
        let ([b1, b2, m, k], [_, _, _, n]) = (dims(&a), dims(&b));
        let (la, lb) = (Operand::of(&a).unwrap(), Operand::of(&b).unwrap());
        let c = Output::new([b1, b2, m, n], None).fill(k, &la, &lb);
        (c, tracked.then_some((a, b)))
    }
}

impl Backward<Flex, 2> for BatchedMatmul {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dc = readable(grads.consume::<Flex>(&ops.node));
        let (a, b) = ops.state;
        let ([b1, b2, m, k], [_, _, _, n]) = (dims(&a), dims(&b));
        let (la, lb, ldc) = (
            Operand::of(&a).unwrap(),
            Operand::of(&b).unwrap(),
            Operand::of(&dc).unwrap(),
        );
        let [pa, pb] = &ops.parents;
        if let Some(node) = pa {
            let like = Some(a.layout().strides());
            let da = Output::new([b1, b2, m, k], like).fill(n, &ldc, &lb.transposed());
            grads.register::<Flex>(node.id, da);
        }
        if let Some(node) = pb {
            let like = Some(b.layout().strides());
            let db = Output::new([b1, b2, k, n], like).fill(m, &la.transposed(), &ldc);
            grads.register::<Flex>(node.id, db);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{assert_close, random, value_and_grads};

    fn strides<const D: usize>(t: &Tensor<D>) -> Vec<isize> {
        t.clone()
            .try_into_primitive::<Flex>()
            .unwrap()
            .layout()
            .strides()
            .to_vec()
    }

    #[test]
    fn matches_burns_matmul_and_its_gradients() {
        // one matrix per core, and matrices large enough for every core
        for ([b1, b2, m, k, n], tol) in [([2, 3, 5, 4, 7], 1e-6), ([1, 2, 200, 256, 190], 1e-5)] {
            let (a, b) = (
                random([b1, b2, m, k], 1.0, 1),
                random([b1, b2, k, n], 0.5, 2),
            );
            let ours = value_and_grads([a.clone(), b.clone()], |[a, b]| {
                matmul(a, b).unwrap_or_else(|_| panic!("flex takes the kernel"))
            });
            let burn = value_and_grads([a, b], |[a, b]| a.matmul(b));
            assert_close(&ours, &burn, tol);
        }
    }

    #[test]
    fn strided_views_as_attention_makes_them() {
        // q [b, t, h, d] split into heads, k used transposed
        let (b, t, h, d) = (2, 6, 3, 4);
        let q = random([b, t, h, d], 1.0, 3);
        let k = random([b, t, h, d], 1.0, 4);
        let f = |[q, k]: [Tensor<4>; 2], ours: bool| {
            let (q, kt) = (q.swap_dims(1, 2), k.swap_dims(1, 2).swap_dims(2, 3));
            if ours {
                matmul(q, kt).unwrap_or_else(|_| panic!("flex"))
            } else {
                q.matmul(kt)
            }
        };
        let ours = value_and_grads([q.clone(), k.clone()], |x| f(x, true));
        let burn = value_and_grads([q, k], |x| f(x, false));
        assert_close(&ours, &burn, 1e-6);
    }

    #[test]
    fn gradients_come_out_in_the_operands_own_order() {
        let k = random([2, 3, 5, 4], 1.0, 5).autodiff().require_grad();
        let q = random([2, 3, 6, 4], 1.0, 6).autodiff().require_grad();
        let kt = k.clone().swap_dims(2, 3);
        let grads = matmul(q, kt)
            .unwrap_or_else(|_| panic!("flex"))
            .sum()
            .backward();
        // ∂kᵀ is laid out as k, so the transpose's backward gives a dense ∂k
        let dk = k.grad(&grads).unwrap();
        assert_eq!(strides(&dk), vec![60, 20, 4, 1]);
    }

    #[test]
    fn by_hand() {
        let device = Default::default();
        let a = Tensor::<4>::from_data([[[[1.0f32, 2.0], [3.0, 4.0]]]], &device);
        let b = Tensor::<4>::from_data([[[[1.0f32, 0.0, 2.0], [1.0, 1.0, -1.0]]]], &device);
        let c = matmul(a, b).unwrap_or_else(|_| panic!("flex"));
        let c: Vec<f32> = c.into_data().iter::<f32>().collect();
        assert_eq!(c, [3.0, 2.0, 0.0, 7.0, 4.0, 2.0]);
    }
}
