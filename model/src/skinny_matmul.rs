//! `x · Wᵀ` for a few rows of `x` (one decoding step), with `W` stored
//! `[out, in]` as Hugging Face stores it.
//!
//! On the CPU backend Burn hands this product to the gemm crate, which
//! packs all of `W` into panels on every call because `Wᵀ` is not
//! column-major; with 8 rows the packing costs more than the arithmetic.
//! [`matmul_transposed`] streams `W` once instead, 4 output rows at a time,
//! against 2 rows of `x` held in registers, the output columns split
//! between this thread and a second one that stays awake between the steps
//! of a decoding loop ([`crate::pair`]). Other backends, tracked tensors,
//! other dtypes and more than [`MAX_ROWS`] rows take Burn's `matmul`.

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::tensor::{DType, Tensor, TensorData};

/// Up to this many rows the streaming kernel wins over gemm.
pub const MAX_ROWS: usize = 32;

/// Below this many multiply-adds one thread does the whole product.
const PARALLEL_MIN: usize = 1 << 17;

/// `x · wᵢᵀ` for each `wᵢ`: with few rows, one streaming pass of both
/// threads for all (a decoding step's `q`, `k`, `v` or gate and up
/// projections), so the threads meet once instead of once per product;
/// otherwise [`matmul_transposed`] each.
pub fn matmul_transposed_each<const N: usize>(x: Tensor<2>, ws: [Tensor<2>; N]) -> [Tensor<2>; N] {
    let [m, k] = x.dims();
    if m <= MAX_ROWS
        && streaming_supported()
        && let Some(ys) = streamed_each(x.clone(), ws.to_vec(), m, k)
    {
        return ys.try_into().expect("one output per weight");
    }
    ws.map(|w| matmul_transposed(x.clone(), w))
}

/// `x · wᵀ` for `x: [m, k]`, `w: [n, k]`.
pub fn matmul_transposed(x: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
    let [m, k] = x.dims();
    if m <= MAX_ROWS
        && streaming_supported()
        && let Some(y) = streamed(x.clone(), w.clone(), m, k)
    {
        return y;
    }
    if w.dtype() != DType::F32 {
        if x.is_autodiff() {
            match crate::frozen_linear::frozen_linear(x, w) {
                Ok(y) => return y,
                Err(operands) => {
                    let (x, w) = *operands;
                    return compact_product(x, w);
                }
            }
        }
        return compact_product(x, w);
    }
    match crate::kernels::linear::linear(x, w) {
        Ok(y) => y,
        Err(operands) => {
            let [x, w] = *operands;
            x.matmul(w.transpose())
        }
    }
}

/// `x · wᵀ` for a bf16 `w` outside autodiff: `w`'s rows in f32 a block at
/// a time, so a 256k-vocabulary head never exists whole in f32.
fn compact_product(x: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
    use crate::frozen_linear::{BLOCK_ELEMENTS, product_in_blocks};
    product_in_blocks(x, &w, BLOCK_ELEMENTS)
}

fn streaming_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the AVX-512 build of the kernel runs (16 lanes instead of 8).
#[cfg(target_arch = "x86_64")]
fn wide_kernel() -> bool {
    std::is_x86_feature_detected!("avx512f")
}

fn streamed(x: Tensor<2>, w: Tensor<2>, m: usize, k: usize) -> Option<Tensor<2>> {
    streamed_each(x, vec![w], m, k)?.pop()
}

/// `x · wᵢᵀ` for every `wᵢ` (all of one dtype) through the streaming
/// kernel, in one pass of both threads.
fn streamed_each(x: Tensor<2>, ws: Vec<Tensor<2>>, m: usize, k: usize) -> Option<Vec<Tensor<2>>> {
    let x: FlexTensor = x.try_into_primitive::<Flex>().ok()?;
    let ws: Vec<FlexTensor> = ws
        .into_iter()
        .map(|w| w.try_into_primitive::<Flex>().ok())
        .collect::<Option<_>>()?;
    let dtype = ws.first()?.dtype();
    if x.dtype() != DType::F32
        || ws
            .iter()
            .any(|w| !w.is_contiguous() || w.dtype() != dtype || w.layout().shape()[1] != k)
    {
        return None;
    }
    let ns: Vec<usize> = ws.iter().map(|w| w.layout().shape()[0]).collect();
    let x = x.into_data();
    let x = x.as_slice::<f32>().ok()?;
    let mut outs: Vec<Vec<f32>> = ns.iter().map(|&n| vec![0.0f32; m * n]).collect();
    // each weight's `n × k` elements
    macro_rules! rows {
        ($t:ty) => {
            ws.iter()
                .map(|w| {
                    let (start, n) = (w.layout().start_offset(), w.layout().shape()[0]);
                    Dense::of(&w.storage::<$t>()[start..], n * k)
                })
                .collect::<Vec<Dense<$t>>>()
        };
    }
    match dtype {
        DType::F32 => multiply_each(x, &rows!(f32), &mut outs, m, k, &ns),
        DType::BF16 => multiply_each(x, &rows!(half::bf16), &mut outs, m, k, &ns),
        _ => return None,
    }
    Some(
        outs.into_iter()
            .zip(ns)
            .map(|(out, n)| {
                Tensor::from_primitive::<Flex>(FlexTensor::from_data(TensorData::new(out, [m, n])))
            })
            .collect(),
    )
}

/// `out[m, n] = x[m, k] · w[n, k]ᵀ`, all row-major.
#[cfg(test)]
fn multiply<W: Weight>(x: &[f32], w: &[W], out: &mut [f32], m: usize, k: usize, n: usize) {
    assert!(out.len() == m * n);
    let mut outs = [vec![0.0; m * n]];
    multiply_each(x, &[Dense::of(w, n * k)], &mut outs, m, k, &[n]);
    out.copy_from_slice(&outs[0]);
}

/// `outs[i] = x[m, k] · ws[i]ᵀ` for weights `[ns[i], k]`, all row-major: the
/// AVX-512 or AVX2/FMA kernel where the CPU has them (checked at run time),
/// plain loops elsewhere. The products' output columns, side by side, are
/// split between the two threads at once, so they meet once for all.
fn multiply_each<S: Rows>(
    x: &[f32],
    ws: &[S],
    outs: &mut [Vec<f32>],
    m: usize,
    k: usize,
    ns: &[usize],
) {
    assert!(x.len() == m * k && ws.len() == outs.len() && ns.len() == outs.len());
    for ((w, out), &n) in ws.iter().zip(outs.iter()).zip(ns) {
        assert!(w.len() == n * k && out.len() == m * n);
    }
    if !streaming_supported() {
        for ((w, out), &n) in ws.iter().zip(outs.iter_mut()).zip(ns) {
            for (xr, or) in x.chunks_exact(k).zip(out.chunks_exact_mut(n)) {
                for (j, o) in or.iter_mut().enumerate() {
                    // SAFETY: `j·k + p < n·k`, the length checked above.
                    *o = xr
                        .iter()
                        .enumerate()
                        .map(|(p, a)| a * unsafe { w.get(j * k + p) })
                        .sum();
                }
            }
        }
        return;
    }
    let ptrs: Vec<OutPtr> = outs.iter_mut().map(|o| OutPtr(o.as_mut_ptr())).collect();
    let total: usize = ns.iter().sum();
    // columns `range` of the products laid side by side
    let columns = |range: std::ops::Range<usize>| {
        let mut at = 0;
        for ((&w, out), &n) in ws.iter().zip(&ptrs).zip(ns) {
            let (from, to) = (range.start.max(at), range.end.min(at + n));
            if from < to {
                let local = from - at..to - at;
                // SAFETY: AVX2 and FMA are checked above (and AVX-512F
                // before its kernel), and so are the sources' lengths; each
                // call writes only the output columns in `local`, and the
                // two threads' ranges are disjoint.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    if wide_kernel() {
                        avx512::columns(x, w, out.0, m, k, n, local)
                    } else {
                        avx2::columns(x, w, out.0, m, k, n, local)
                    }
                }
                #[cfg(not(target_arch = "x86_64"))]
                unreachable!("{local:?} {}", w.len())
            }
            at += n;
        }
    };
    if m * total * k < PARALLEL_MIN || total < 16 || !crate::pair::has_two_cores() {
        columns(0..total);
    } else {
        let half = total / 2 / 4 * 4;
        crate::pair::join(|| columns(0..half), || columns(half..total));
    }
}

/// A row-major matrix the streaming kernel reads, from some element on:
/// dense f32 or bf16, or quantized blocks ([`crate::quant`]).
pub(crate) trait Rows: Copy + Send + Sync {
    /// Whether a group of rows is widened into an f32 buffer once for all
    /// rows of `x` (packed weights, whose widening costs more than a load).
    const WIDEN_FIRST: bool = false;
    /// Elements readable from here on.
    fn len(&self) -> usize;
    /// The same matrix from `i` elements further on.
    ///
    /// # Safety
    /// `i` is at most [`Rows::len`].
    unsafe fn skip(self, i: usize) -> Self;
    /// Element `i`.
    ///
    /// # Safety
    /// `i` is below [`Rows::len`].
    unsafe fn get(self, i: usize) -> f32;
    /// Where element `i` lies, for a prefetch (any `i`: never read).
    fn prefetch_ptr(self, i: usize) -> *const i8;
    /// Elements `i..i + 8` as f32 lanes.
    ///
    /// # Safety
    /// AVX2 is available and the elements are readable; quantized sources
    /// need them in one block.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(self, i: usize) -> std::arch::x86_64::__m256;
    /// Elements `i..i + 16` as f32 lanes.
    ///
    /// # Safety
    /// AVX-512F is available and the elements are readable; quantized
    /// sources need them in one block.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(self, i: usize) -> std::arch::x86_64::__m512;
}

/// A dense matrix of `W`.
#[derive(Clone, Copy)]
pub(crate) struct Dense<W> {
    ptr: *const W,
    len: usize,
}

// SAFETY: a read-only view of a slice of `Sync` elements.
unsafe impl<W: Sync> Send for Dense<W> {}
unsafe impl<W: Sync> Sync for Dense<W> {}

impl<W: Weight> Dense<W> {
    /// The first `len` elements of `w`.
    pub(crate) fn of(w: &[W], len: usize) -> Self {
        assert!(len <= w.len());
        Self {
            ptr: w.as_ptr(),
            len,
        }
    }
}

impl<W: Weight> Rows for Dense<W> {
    fn len(&self) -> usize {
        self.len
    }

    #[inline(always)]
    unsafe fn skip(self, i: usize) -> Self {
        Self {
            // SAFETY: the caller's contract.
            ptr: unsafe { self.ptr.add(i) },
            len: self.len - i,
        }
    }

    #[inline(always)]
    unsafe fn get(self, i: usize) -> f32 {
        // SAFETY: the caller's contract.
        unsafe { (*self.ptr.add(i)).to_f32() }
    }

    #[inline(always)]
    fn prefetch_ptr(self, i: usize) -> *const i8 {
        self.ptr.wrapping_add(i) as *const i8
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(self, i: usize) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller's contract.
        unsafe { W::load8(self.ptr.add(i)) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(self, i: usize) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller's contract.
        unsafe { W::load16(self.ptr.add(i)) }
    }
}

/// A quantized matrix ([`crate::quant::QuantMatrix`]) from element `at` on;
/// `NF4` says which of the two formats.
#[derive(Clone, Copy)]
pub(crate) struct Packed<const NF4: bool> {
    data: *const u8,
    scales: *const f32,
    at: usize,
    end: usize,
}

// SAFETY: a read-only view of a matrix that outlives the product.
unsafe impl<const NF4: bool> Send for Packed<NF4> {}
unsafe impl<const NF4: bool> Sync for Packed<NF4> {}

impl<const NF4: bool> Packed<NF4> {
    fn of(q: &crate::quant::QuantMatrix) -> Self {
        assert_eq!(NF4, q.format == crate::quant::QuantFormat::Nf4);
        Self {
            data: q.data.as_ptr(),
            scales: q.scales.as_ptr(),
            at: 0,
            end: q.rows * q.cols,
        }
    }
}

impl<const NF4: bool> Rows for Packed<NF4> {
    const WIDEN_FIRST: bool = true;

    fn len(&self) -> usize {
        self.end - self.at
    }

    #[inline(always)]
    unsafe fn skip(self, i: usize) -> Self {
        Self {
            at: self.at + i,
            ..self
        }
    }

    #[inline(always)]
    unsafe fn get(self, i: usize) -> f32 {
        use crate::quant::{BLOCK, NF4 as CODE};
        let e = self.at + i;
        // SAFETY: the caller's contract.
        unsafe {
            let m = *self.scales.add(e / BLOCK);
            if NF4 {
                let b = *self.data.add(e / 2);
                CODE[usize::from(if e.is_multiple_of(2) { b >> 4 } else { b & 15 })] * m
            } else {
                (*self.data.add(e) as i8) as f32 * m
            }
        }
    }

    #[inline(always)]
    fn prefetch_ptr(self, i: usize) -> *const i8 {
        let e = self.at + i;
        self.data.wrapping_add(if NF4 { e / 2 } else { e }) as *const i8
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(self, i: usize) -> std::arch::x86_64::__m256 {
        use crate::quant::{BLOCK, simd};
        let e = self.at + i;
        // SAFETY: the caller's contract.
        unsafe {
            let m = *self.scales.add(e / BLOCK);
            if NF4 {
                simd::nf4x8(self.data.add(e / 2), m)
            } else {
                simd::int8x8(self.data.add(e), m)
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(self, i: usize) -> std::arch::x86_64::__m512 {
        use crate::quant::{BLOCK, simd};
        let e = self.at + i;
        // SAFETY: the caller's contract.
        unsafe {
            let m = *self.scales.add(e / BLOCK);
            if NF4 {
                simd::nf4x16(self.data.add(e / 2), m)
            } else {
                simd::int8x16(self.data.add(e), m)
            }
        }
    }
}

/// `x · qᵢᵀ` for `x [m, k]` and quantized weights `[nᵢ, k]` of one format,
/// in one streaming pass; `None` where the kernel does not apply (more than
/// [`MAX_ROWS`] rows, rows not whole blocks, no AVX2).
pub(crate) fn quantized_each(
    x: &[f32],
    qs: &[&crate::quant::QuantMatrix],
    m: usize,
    k: usize,
) -> Option<Vec<Vec<f32>>> {
    use crate::quant::{BLOCK, QuantFormat};
    let format = qs.first()?.format;
    if m > MAX_ROWS
        || !streaming_supported()
        || !k.is_multiple_of(BLOCK)
        || qs.iter().any(|q| q.cols != k || q.format != format)
    {
        return None;
    }
    let ns: Vec<usize> = qs.iter().map(|q| q.rows).collect();
    let mut outs: Vec<Vec<f32>> = ns.iter().map(|&n| vec![0.0f32; m * n]).collect();
    match format {
        QuantFormat::Nf4 => {
            let ws: Vec<Packed<true>> = qs.iter().map(|q| Packed::of(q)).collect();
            multiply_each(x, &ws, &mut outs, m, k, &ns)
        }
        QuantFormat::Int8 => {
            let ws: Vec<Packed<false>> = qs.iter().map(|q| Packed::of(q)).collect();
            multiply_each(x, &ws, &mut outs, m, k, &ns)
        }
    }
    Some(outs)
}

/// A weight element the kernel reads: f32, or bf16 widened to f32 on load
/// (a compact frozen model's matrices).
pub(crate) trait Weight: Copy + Sync {
    fn to_f32(self) -> f32;
    /// Eight consecutive weights as f32 lanes.
    ///
    /// # Safety
    /// AVX2 is available and `p` points to eight readable elements.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    /// Sixteen consecutive weights as f32 lanes.
    ///
    /// # Safety
    /// AVX-512F is available and `p` points to sixteen readable elements.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl Weight for f32 {
    fn to_f32(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller's contract.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller's contract.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
}

impl Weight for half::bf16 {
    fn to_f32(self) -> f32 {
        f32::from(self)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract; bf16 is the high half of an f32.
        unsafe {
            let h = _mm_loadu_si128(p as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract; bf16 is the high half of an f32.
        unsafe {
            let h = _mm256_loadu_si256(p as *const __m256i);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }
    }
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the threads that share it write disjoint columns.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// The streaming kernel for one vector width: `columns`, `rows` and
/// `block` compiled with `$features`, a vector holding `$lanes` floats.
#[cfg(target_arch = "x86_64")]
macro_rules! streaming_kernel {
    ($name:ident, $features:literal, $lanes:literal, $load:ident, $zero:ident,
     $loadx:ident, $store:ident, $fma:ident, $sum:expr) => {
        mod $name {
            use super::{Dense, Rows};
            #[allow(unused_imports)]
            use std::arch::x86_64::*;
            /// Floats of `w` prefetched ahead of the loads in long rows.
            const PF: usize = 128;
            /// Rows up to this long prefetch the next block of rows instead.
            const SHORT_ROW: usize = 512;

            /// Output columns `range` of `x · wᵀ`.
            ///
            /// # Safety
            /// The CPU has the kernel's features, `x` is `m·k`, `w` is `n·k`
            /// and `out` points to `m·n` floats, and `range` lies within `0..n`.
            #[target_feature(enable = $features)]
            pub unsafe fn columns<S: Rows>(
                x: &[f32],
                w: S,
                out: *mut f32,
                m: usize,
                k: usize,
                n: usize,
                range: std::ops::Range<usize>,
            ) {
                if S::WIDEN_FIRST && m > 1 {
                    // SAFETY: the caller's contract.
                    return unsafe { widened(x, w, out, m, k, n, range) };
                }
                let x = x.as_ptr();
                let mut j = range.start;
                // SAFETY: the caller's contract; `rows` reads rows `j..j + J`
                // of `w` and writes columns `j..j + J` of `out`, all within
                // `range`.
                unsafe {
                    while j + 4 <= range.end {
                        rows::<S, 2, 4>(x, w.skip(j * k), out.add(j), m, k, n);
                        j += 4;
                    }
                    while j < range.end {
                        rows::<S, 1, 1>(x, w.skip(j * k), out.add(j), m, k, n);
                        j += 1;
                    }
                }
            }

            /// [`columns`] with every group of 4 rows of `w` widened once
            /// into an f32 buffer (in L1/L2) that all `m` rows of `x` then
            /// read: a packed weight is widened once instead of once per
            /// 2 rows of `x`, with the same values and sums.
            ///
            /// # Safety
            /// As [`columns`], and `k` a multiple of the lanes.
            #[target_feature(enable = $features)]
            unsafe fn widened<S: Rows>(
                x: &[f32],
                w: S,
                out: *mut f32,
                m: usize,
                k: usize,
                n: usize,
                range: std::ops::Range<usize>,
            ) {
                debug_assert!(k % $lanes == 0);
                let mut buf = vec![0f32; 4 * k];
                let x = x.as_ptr();
                let mut j = range.start;
                // SAFETY: the caller's contract; the loads stay within rows
                // `j..j + len` of `w`, the stores within `buf`.
                unsafe {
                    while j < range.end {
                        let len = 4.min(range.end - j);
                        let rows_of = w.skip(j * k);
                        let mut p = 0;
                        while p < len * k {
                            $store(buf.as_mut_ptr().add(p), rows_of.$load(p));
                            p += $lanes;
                        }
                        let dense = Dense::of(&buf, len * k);
                        if len == 4 {
                            rows::<Dense<f32>, 2, 4>(x, dense, out.add(j), m, k, n);
                        } else {
                            for r in 0..len {
                                rows::<Dense<f32>, 1, 1>(
                                    x,
                                    dense.skip(r * k),
                                    out.add(j + r),
                                    m,
                                    k,
                                    n,
                                );
                            }
                        }
                        j += len;
                    }
                }
            }

            /// `x · wᵀ` for the `J` rows of `w` at `w` into the columns at `out`.
            ///
            /// # Safety
            /// The CPU has the kernel's features, `x` points to `m·k` floats,
            /// `w` to `J` rows of `k`, and `out` to `m` rows of `n` floats
            /// with `J` columns left.
            #[target_feature(enable = $features)]
            unsafe fn rows<S: Rows, const R: usize, const J: usize>(
                x: *const f32,
                w: S,
                out: *mut f32,
                m: usize,
                k: usize,
                n: usize,
            ) {
                let mut r = 0;
                // SAFETY: the caller's contract; each block reads `R` rows of
                // `x` below `m` and writes `R` rows of `out`.
                unsafe {
                    while r + R <= m {
                        block::<S, R, J>(x.add(r * k), w, out.add(r * n), k, n);
                        r += R;
                    }
                    while r < m {
                        block::<S, 1, J>(x.add(r * k), w, out.add(r * n), k, n);
                        r += 1;
                    }
                }
            }

            /// `R` rows of `x` against `J` rows of `w`, accumulated in `R·J`
            /// registers.
            ///
            /// # Safety
            /// The CPU has the kernel's features, `x` points to `R` rows of
            /// `k` floats, `w` to `J` rows of `k`, and `out` to `R` rows of
            /// stride `n` with `J` columns left.
            #[target_feature(enable = $features)]
            unsafe fn block<S: Rows, const R: usize, const J: usize>(
                x: *const f32,
                w: S,
                out: *mut f32,
                k: usize,
                n: usize,
            ) {
                let kv = k / $lanes * $lanes;
                let ahead = if k <= SHORT_ROW { J * k } else { PF };
                let mut acc = [[$zero(); J]; R];
                let mut p = 0;
                // SAFETY: the caller's contract; loads stay below `kv ≤ k` in
                // each row and the tail below `k`; prefetches may point past
                // `w` but never fault (`wrapping_add`).
                unsafe {
                    while p < kv {
                        let mut wv = [$zero(); J];
                        for j in 0..J {
                            _mm_prefetch::<_MM_HINT_T0>(w.prefetch_ptr(j * k + p + ahead));
                        }
                        for (j, v) in wv.iter_mut().enumerate() {
                            *v = w.$load(j * k + p);
                        }
                        for (r, row) in acc.iter_mut().enumerate() {
                            let xv = $loadx(x.add(r * k + p));
                            for (a, &v) in row.iter_mut().zip(&wv) {
                                *a = $fma(xv, v, *a);
                            }
                        }
                        p += $lanes;
                    }
                    // a closure in this function: it has the kernel's features
                    let sum = $sum;
                    for (r, row) in acc.iter().enumerate() {
                        for (j, &a) in row.iter().enumerate() {
                            let mut s = sum(a);
                            for q in kv..k {
                                s += *x.add(r * k + q) * w.get(j * k + q);
                            }
                            *out.add(r * n + j) = s;
                        }
                    }
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
streaming_kernel!(
    avx2,
    "avx2,fma",
    8,
    load8,
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    _mm256_fmadd_ps,
    |v| {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }
);

#[cfg(target_arch = "x86_64")]
streaming_kernel!(
    avx512,
    "avx512f",
    16,
    load16,
    _mm512_setzero_ps,
    _mm512_loadu_ps,
    _mm512_storeu_ps,
    _mm512_fmadd_ps,
    |v| _mm512_reduce_add_ps(v)
);

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    fn reference(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut out = vec![0.0; m * n];
        for r in 0..m {
            for j in 0..n {
                out[r * n + j] = (0..k)
                    .map(|p| x[r * k + p] as f64 * w[j * k + p] as f64)
                    .sum();
            }
        }
        out
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 2001)
            .map(|v| v as f32 / 1000.0 - 1.0)
            .collect()
    }

    /// Every remainder of the 2-row, 4-column, 8-lane blocking, and both
    /// the one-thread and the two-thread split.
    #[test]
    fn matches_a_float64_reference_for_every_remainder() {
        let device = Device::default();
        for (m, k, n) in [
            (1, 1, 1),
            (1, 8, 4),
            (2, 9, 5),
            (3, 17, 7),
            (8, 256, 1024),
            (7, 1024, 259),
            (32, 64, 514),
        ] {
            let (x, w) = (values(m * k, 1), values(n * k, 2));
            let xt = Tensor::<2>::from_data(TensorData::new(x.clone(), [m, k]), &device);
            let wt = Tensor::<2>::from_data(TensorData::new(w.clone(), [n, k]), &device);
            let got = matmul_transposed(xt, wt)
                .into_data()
                .try_into_vec::<f32>()
                .unwrap();
            for (i, (g, r)) in got.iter().zip(reference(&x, &w, m, k, n)).enumerate() {
                assert!(
                    (*g as f64 - r).abs() <= 1e-5 * (1.0 + r.abs()) * (k as f64).sqrt(),
                    "{m}x{k}x{n} [{i}]: {g} vs {r}"
                );
            }
        }
    }

    /// bf16 weights (a compact model) stream through the same kernel,
    /// widened to f32 on load.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn bf16_weights_stream_with_the_values_they_hold() {
        let device = Device::default();
        for (m, k, n) in [(1, 9, 5), (3, 40, 600), (2, 256, 17)] {
            let x = values(m * k, 5);
            let w: Vec<f32> = values(n * k, 6)
                .into_iter()
                .map(|v| half::bf16::from_f32(v).to_f32())
                .collect();
            let xt = Tensor::<2>::from_data(TensorData::new(x.clone(), [m, k]), &device);
            let wt = Tensor::<2>::from_data(TensorData::new(w.clone(), [n, k]), &device)
                .cast(DType::BF16);
            let got = streamed(xt, wt, m, k)
                .expect("bf16 weights take the streaming path")
                .into_data()
                .try_into_vec::<f32>()
                .unwrap();
            for (g, r) in got.iter().zip(reference(&x, &w, m, k, n)) {
                assert!(
                    (*g as f64 - r).abs() <= 1e-4 * (1.0 + r.abs()),
                    "{g} vs {r}"
                );
            }
        }
    }

    /// The streaming kernel itself (not the fallback) runs on the CPU
    /// backend and fills every output.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_cpu_backend_takes_the_streaming_kernel() {
        assert!(streaming_supported(), "this x86-64 CPU lacks AVX2/FMA");
        let device = Device::default();
        let (m, k, n) = (5, 40, 600);
        let (x, w) = (values(m * k, 3), values(n * k, 4));
        let xt = Tensor::<2>::from_data(TensorData::new(x.clone(), [m, k]), &device);
        let wt = Tensor::<2>::from_data(TensorData::new(w.clone(), [n, k]), &device);
        let got = streamed(xt, wt, m, k)
            .expect("flex f32 tensors take the streaming path")
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        for (g, r) in got.iter().zip(reference(&x, &w, m, k, n)) {
            assert!((*g as f64 - r).abs() <= 1e-4, "{g} vs {r}");
        }
    }

    /// Both vector widths (the AVX-512 one where the CPU has it) agree with
    /// the reference on every remainder of their lanes.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn each_vector_width_matches_a_float64_reference() {
        assert!(streaming_supported(), "the kernels need AVX2/FMA");
        for (m, k, n) in [(1, 1, 3), (3, 17, 7), (2, 40, 9), (5, 300, 13)] {
            let (x, w) = (values(m * k, 7), values(n * k, 8));
            let want = reference(&x, &w, m, k, n);
            let mut got = vec![vec![0.0; m * n]];
            // SAFETY: AVX2/FMA checked above, sizes as documented.
            unsafe { avx2::columns(&x, Dense::of(&w, n * k), got[0].as_mut_ptr(), m, k, n, 0..n) };
            if wide_kernel() {
                got.push(vec![0.0; m * n]);
                // SAFETY: AVX-512F checked, sizes as documented.
                unsafe {
                    avx512::columns(&x, Dense::of(&w, n * k), got[1].as_mut_ptr(), m, k, n, 0..n)
                };
            }
            for out in &got {
                for (g, r) in out.iter().zip(&want) {
                    assert!(
                        (*g as f64 - r).abs() <= 1e-5 * (1.0 + r.abs()),
                        "{m}x{k}x{n}: {g} vs {r}"
                    );
                }
            }
        }
    }

    /// Several products in one pass give each product's own bits, whichever
    /// thread computes which of its columns (here the threads' split falls
    /// at column 290 of the second product, off the kernel's blocks of 4).
    #[test]
    fn products_in_one_pass_give_the_bits_of_each() {
        let device = Device::default();
        let (m, k) = (8, 300);
        let x = Tensor::<2>::from_data(TensorData::new(values(m * k, 1), [m, k]), &device);
        let ws: [Tensor<2>; 3] = std::array::from_fn(|i| {
            let n = [62, 514, 130][i];
            Tensor::from_data(
                TensorData::new(values(n * k, 2 + i as u32), [n, k]),
                &device,
            )
        });
        let each = matmul_transposed_each(x.clone(), ws.clone());
        for (y, w) in each.into_iter().zip(ws) {
            let alone = matmul_transposed(x.clone(), w);
            assert_eq!(y.dims(), alone.dims());
            assert_eq!(
                y.into_data().try_into_vec::<f32>().unwrap(),
                alone.into_data().try_into_vec::<f32>().unwrap()
            );
        }
    }

    /// Splitting the columns between two threads leaves every output's
    /// arithmetic unchanged, so samples do not depend on the thread count.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn two_threads_give_the_bits_of_one() {
        assert!(
            streaming_supported(),
            "the kernel under test needs AVX2/FMA"
        );
        let (m, k, n) = (8, 300, 1030);
        assert!(m * n * k >= PARALLEL_MIN);
        let (x, w) = (values(m * k, 5), values(n * k, 6));
        let mut split = vec![0.0; m * n];
        multiply(&x, &w, &mut split, m, k, n);
        let mut whole = vec![0.0; m * n];
        // SAFETY: the kernel's features checked above, sizes as documented.
        unsafe {
            if wide_kernel() {
                avx512::columns(&x, Dense::of(&w, n * k), whole.as_mut_ptr(), m, k, n, 0..n)
            } else {
                avx2::columns(&x, Dense::of(&w, n * k), whole.as_mut_ptr(), m, k, n, 0..n)
            }
        };
        assert_eq!(split, whole);
    }
}
