//! `y = x·Wᵀ` for a linear layer's f32 weight `W [n, k]` on `flex`, with its
//! own backward: `∂x = ∂y·W`, `∂W = ∂yᵀ·x`.
//!
//! Each product is one call of the gemm crate (the one behind Burn's
//! `matmul`) into a buffer it fills, with the operands read through their
//! strides. Burn's `x.matmul(w.transpose())` zeroes and copies every
//! product's output before gemm overwrites it, and its backward returns
//! `∂W` as the transpose of `xᵀ·∂y`, a strided view that the optimizer then
//! copies; here `∂W` comes out in `W`'s own layout, and is not computed at
//! all for a frozen `W`. `y` and `∂x` are Burn's products bit for bit (the
//! same gemm call).

use burn::backend::Flex;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::tensor::Tensor;

use super::{Fused, apply, contiguous, f32s, flex_tensor};

/// Products with at least this many multiply-adds use every core (Burn's
/// threshold for its own gemm calls).
const PARALLEL_MIN: usize = 192 * 192 * 192;

/// `x · wᵀ` for `x [m, k]` and an f32 `w [n, k]` on flex (plain or
/// autodiff); `Err` gives the operands back elsewhere.
pub fn linear(x: Tensor<2>, w: Tensor<2>) -> Result<Tensor<2>, Box<[Tensor<2>; 2]>> {
    if x.dims()[1] != w.dims()[1] {
        return Err(Box::new([x, w]));
    }
    apply([x, w], Linear).map_err(Box::new)
}

/// A row-major `[rows, cols]` matrix or the transpose of one, as gemm reads it.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    /// Strides between rows and between columns of the matrix as read.
    rs: isize,
    cs: isize,
}

impl<'a> View<'a> {
    fn rows(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            rs: cols as isize,
            cs: 1,
        }
    }

    fn transposed(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            rs: 1,
            cs: cols as isize,
        }
    }
}

/// A matrix as gemm reads it: its first element and the strides between
/// rows and between columns.
#[derive(Clone, Copy)]
pub(crate) struct Strided {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

/// Writes `dst (i, j) = Σ_l a(i, l)·b(l, j)` for an `m × n` product with
/// inner dimension `k`, without reading `dst` first.
///
/// # Safety
/// `dst` must be valid for writes at `i·dst_rs + j·dst_cs` for every `i < m`,
/// `j < n`, with no other thread writing those elements meanwhile, and `a`,
/// `b` valid for reads through their strides over `m × k` and `k × n`.
pub(crate) unsafe fn write_product(
    [m, n, k]: [usize; 3],
    dst: *mut f32,
    [dst_rs, dst_cs]: [isize; 2],
    a: Strided,
    b: Strided,
    parallelism: gemm::Parallelism,
) {
    // SAFETY: the caller's contract is gemm's with `read_dst` false.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_cs,
            dst_rs,
            false,
            a.ptr,
            a.cs,
            a.rs,
            b.ptr,
            b.cs,
            b.rs,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

impl View<'_> {
    fn strided(&self, offset: isize) -> Strided {
        Strided {
            ptr: self.data.as_ptr().wrapping_offset(offset),
            rs: self.rs,
            cs: self.cs,
        }
    }
}

/// `out [m, n] = a [m, k] · b [k, n]`, row-major out, for operands given
/// as `(elements, row stride, column stride)`.
pub(crate) fn strided_product(
    [m, n, k]: [usize; 3],
    (a, ars, acs): (&[f32], usize, usize),
    (b, brs, bcs): (&[f32], usize, usize),
) -> Vec<f32> {
    let view = |data, rs: usize, cs: usize| View {
        data,
        rs: rs as isize,
        cs: cs as isize,
    };
    product(m, n, k, view(a, ars, acs), view(b, brs, bcs))
}

/// `out [m, n] = a [m, k] · b [k, n]`, row-major out.
fn product(m: usize, n: usize, k: usize, a: View, b: View) -> Vec<f32> {
    assert!(a.data.len() >= m * k && b.data.len() >= k * n);
    if k == 0 {
        return vec![0.0; m * n];
    }
    let parallelism = if m.saturating_mul(n).saturating_mul(k) >= PARALLEL_MIN {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    let mut out = Vec::<f32>::with_capacity(m * n);
    if matches!(parallelism, gemm::Parallelism::Rayon(_)) && b.rs == 1 && b.cs != 1 {
        by_column_blocks(m, n, k, a, b, &mut out);
        return out;
    }
    // SAFETY: the views hold `m·k` and `k·n` elements read through their
    // strides (asserted); each of the `m·n` outputs (within the capacity) is
    // written once, so all are set after it.
    unsafe {
        let (a, b) = (a.strided(0), b.strided(0));
        write_product(
            [m, n, k],
            out.as_mut_ptr(),
            [n as isize, 1],
            a,
            b,
            parallelism,
        );
        out.set_len(m * n);
    }
    out
}

/// `out = a · b` for a `b` stored by columns (a weight read transposed),
/// one block of output columns per core. gemm, given the whole product,
/// packs all of `b` on the calling thread before the cores start (it packs
/// a left operand of up to 1024 rows that is not stored by columns up
/// front, and it computes a row-major product as its transpose); a block
/// each, the cores pack their own parts at once. The sums run in the same
/// order either way.
fn by_column_blocks(m: usize, n: usize, k: usize, a: View, b: View, out: &mut Vec<f32>) {
    use rayon::prelude::*;
    let width = n
        .div_ceil(rayon::current_num_threads())
        .next_multiple_of(16);
    let base = out.as_mut_ptr() as usize;
    (0..n.div_ceil(width)).into_par_iter().for_each(|block| {
        let from = block * width;
        let cols = width.min(n - from);
        // SAFETY: block `block` writes columns `from..from + cols` of the
        // `m × n` output (within its capacity), which no other block writes,
        // each once without reading (`read_dst` false); `b`'s columns from
        // `from` on are within `b.data` (asserted by the caller).
        unsafe {
            let dst = (base as *mut f32).add(from);
            let (a, b) = (a.strided(0), b.strided(from as isize * b.cs));
            write_product(
                [m, cols, k],
                dst,
                [n as isize, 1],
                a,
                b,
                gemm::Parallelism::None,
            )
        }
    });
    // SAFETY: every block's columns were written above.
    unsafe { out.set_len(m * n) };
}

fn dims(t: &FlexTensor) -> (usize, usize) {
    let s = t.layout().shape();
    (s[0], s[1])
}

#[derive(Debug, Clone)]
struct Linear;

impl Fused<2> for Linear {
    fn forward(&self, [x, w]: [FlexTensor; 2], tracked: bool) -> (FlexTensor, Option<Self::State>) {
        let (x, w) = (contiguous(x).expect("f32"), contiguous(w).expect("f32"));
        let ((m, k), (n, _)) = (dims(&x), dims(&w));
        let y = product(
            m,
            n,
            k,
            View::rows(f32s(&x).expect("f32"), k),
            View::transposed(f32s(&w).expect("f32"), k),
        );
        (flex_tensor(y, &[m, n]), tracked.then_some((x, w)))
    }
}

impl Backward<Flex, 2> for Linear {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = contiguous(grads.consume::<Flex>(&ops.node)).expect("f32 gradient");
        let (x, w) = ops.state;
        let ((m, k), (n, _)) = (dims(&x), dims(&w));
        let (dy, xs, ws) = (f32s(&dy).unwrap(), f32s(&x).unwrap(), f32s(&w).unwrap());
        let [px, pw] = &ops.parents;
        if let Some(node) = px {
            let dx = product(m, k, n, View::rows(dy, n), View::rows(ws, k));
            grads.register::<Flex>(node.id, flex_tensor(dx, &[m, k]));
        }
        if let Some(node) = pw {
            let dw = product(n, k, m, View::transposed(dy, n), View::rows(xs, k));
            grads.register::<Flex>(node.id, flex_tensor(dw, &[n, k]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{assert_close, random, value_and_grads};

    #[test]
    fn matches_burns_matmul_and_its_gradients() {
        // small (one thread) and large enough for every core
        for (m, k, n) in [(3, 5, 4), (70, 33, 9), (300, 256, 200)] {
            let (x, w) = (random([m, k], 1.0, 1), random([n, k], 0.5, 2));
            let ours = value_and_grads([x.clone(), w.clone()], |[x, w]| {
                linear(x, w).unwrap_or_else(|_| panic!("flex takes the kernel"))
            });
            let burn = value_and_grads([x, w], |[x, w]| x.matmul(w.transpose()));
            assert_close(&ours, &burn, 1e-5);
            // the output and the input's gradient are Burn's products bit for bit
            assert_eq!(ours[0], burn[0], "{m}x{k}x{n}");
            assert_eq!(ours[1], burn[1], "{m}x{k}x{n}");
        }
    }

    #[test]
    fn by_hand_and_plain_tensors() {
        let device = Default::default();
        let x = Tensor::<2>::from_data([[1.0f32, 2.0], [3.0, 4.0]], &device);
        let w = Tensor::<2>::from_data([[1.0f32, 0.0], [1.0, 1.0], [0.0, -2.0]], &device);
        let y = linear(x, w).unwrap_or_else(|_| panic!("flex"));
        let y: Vec<f32> = y.into_data().iter::<f32>().collect();
        assert_eq!(y, [1.0, 3.0, -4.0, 3.0, 7.0, -8.0]);
    }

    #[test]
    fn a_frozen_weight_gets_no_gradient() {
        let (x, w) = (random([4, 6], 1.0, 3), random([5, 6], 1.0, 4));
        let x = x.autodiff().require_grad();
        let w = w.autodiff();
        let y = linear(x.clone(), w.clone()).unwrap_or_else(|_| panic!("flex"));
        let grads = y.sum().backward();
        assert!(x.grad(&grads).is_some());
        assert!(w.grad(&grads).is_none());
    }
}
