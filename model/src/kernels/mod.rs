//! Fused CPU kernels for `flex`: Gemma's element-wise and row-wise passes
//! (GeGLU, RMSNorm, RoPE, the capped attention softmax, the vocabulary
//! log-softmax and final soft-cap, the gradient norm's sum of squares and
//! the clipping scale, the AdamW step, the weighted sum of two parameter
//! sets) in one pass over memory each way, split over the cores, with their own
//! backward under autodiff; the linear layers' and attention's products
//! as direct gemm calls each way (`linear`, `matmul`); and a decoding
//! step's attention over the KV cache where it lies (`decode_attention`).
//!
//! Burn's `flex` runs each element-wise op as its own single-threaded pass
//! (scalar `expf` included); a GeGLU is ~8 of them forward and more
//! backward. Each kernel here is one loop written in plain `f32` arithmetic
//! (no fused multiply-add, so the AVX2 build of a loop and the portable one
//! give the same bits), compiled twice: for AVX2 when the CPU has it (a
//! runtime check) and for the baseline target. Other backends, dtypes other
//! than f32, and `POSTTRAIN_FUSED=0` take Burn's unfused expression: each
//! entry point returns its operands back (`Err`) when it does not apply.

pub mod adamw;
pub(crate) mod decode_attention;
pub(crate) mod exp;
pub(crate) mod geglu;
pub(crate) mod linear;
pub mod log_softmax;
pub(crate) mod matmul;
pub(crate) mod rms_norm;
pub(crate) mod rope;
pub mod scale;
pub(crate) mod softmax;
pub mod sum_squares;
#[cfg(test)]
mod testing;
pub mod weighted_sum;

use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, NoCheckpointing};
use burn::backend::autodiff::ops::{Backward, NodeGuard, OpsKind};
use burn::backend::flex::{FlexTensor, Layout};
use burn::backend::{Autodiff, Flex};
use burn::tensor::{DType, Tensor, TensorData};

/// Compiles `fn name(args) body` three times (AVX-512F, AVX2, baseline) and
/// picks at run time. The body must not use `mul_add`, so all give the same
/// results.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn widest($($arg: $ty),*) {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                unsafe fn wide($($arg: $ty),*) {
                    body($($arg),*)
                }
                let allowed = $crate::kernels::widest_build();
                if allowed >= 2 && std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the running CPU has AVX-512F.
                    return unsafe { widest($($arg),*) };
                }
                if allowed >= 1 && std::is_x86_feature_detected!("avx2") {
                    // SAFETY: the running CPU has AVX2.
                    return unsafe { wide($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// The widest build of a multi-versioned kernel that may run: 2 AVX-512F,
/// 1 AVX2, 0 the baseline.
static WIDEST_BUILD: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(2);

/// Caps the builds the kernels pick from (2 AVX-512F, 1 AVX2, 0 the
/// baseline): every build gives the same bits, and tests compare them.
pub fn cap_build(widest: u8) {
    WIDEST_BUILD.store(widest, std::sync::atomic::Ordering::Relaxed);
}

pub(crate) fn widest_build() -> u8 {
    WIDEST_BUILD.load(std::sync::atomic::Ordering::Relaxed)
}

/// Elements a core takes at once: small tensors stay on one core.
pub(crate) const GRAIN: usize = 1 << 14;

/// Whether the fused kernels are used (`POSTTRAIN_FUSED=0` turns them off,
/// to compare against Burn's unfused expressions).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("POSTTRAIN_FUSED").map_or(true, |v| v != "0"))
}

/// Kernel outputs of `lens[j]` floats each, filled in parallel by
/// `fill(i, chunks)` with chunk `i` (`grains[j]` floats) of every output;
/// returns the outputs and each chunk's result in chunk order. Each chunk is
/// zeroed just before, by the thread that fills it: `vec![0.0; len]` would
/// zero (and page-fault) the whole buffer first on the calling thread, a
/// serial pass as long as a kernel's own while the other cores wait.
pub(crate) fn par_outputs<const N: usize, R: Send>(
    lens: [usize; N],
    grains: [usize; N],
    fill: impl Fn(usize, [&mut [f32]; N]) -> R + Sync,
) -> ([Vec<f32>; N], Vec<R>) {
    use rayon::prelude::*;
    let chunks = lens[0].div_ceil(grains[0].max(1));
    for j in 0..N {
        assert_eq!(
            lens[j].div_ceil(grains[j].max(1)),
            chunks,
            "output {j}'s chunks"
        );
    }
    let mut outs: [Vec<f32>; N] = std::array::from_fn(|j| Vec::with_capacity(lens[j]));
    // addresses, so the closure is Sync; each chunk is written by one task
    let bases: [usize; N] = std::array::from_fn(|j| outs[j].as_mut_ptr() as usize);
    let results: Vec<R> = (0..chunks)
        .into_par_iter()
        .map(|i| {
            let slices = std::array::from_fn(|j| {
                let from = (i * grains[j]).min(lens[j]);
                let len = ((i + 1) * grains[j]).min(lens[j]) - from;
                // SAFETY: `from + len ≤ lens[j]`, within the capacity; chunk
                // `i` of output `j` is disjoint from every other chunk, and it
                // is zeroed before the slice is made.
                unsafe {
                    let at = (bases[j] as *mut f32).add(from);
                    std::ptr::write_bytes(at, 0, len);
                    std::slice::from_raw_parts_mut(at, len)
                }
            });
            fill(i, slices)
        })
        .collect();
    for (out, &len) in outs.iter_mut().zip(&lens) {
        // SAFETY: every chunk of `0..len` was zeroed, then filled, above.
        unsafe { out.set_len(len) };
    }
    (outs, results)
}

/// Chunk `i` of `grain` elements of `x`.
pub(crate) fn chunk(x: &[f32], i: usize, grain: usize) -> &[f32] {
    let from = (i * grain).min(x.len());
    &x[from..((i + 1) * grain).min(x.len())]
}

/// A contiguous f32 flex tensor's elements.
pub(crate) fn f32s(t: &FlexTensor) -> Option<&[f32]> {
    if t.dtype() != DType::F32 || !t.is_contiguous() {
        return None;
    }
    let n = t.layout().num_elements();
    let at = t.layout().start_offset();
    Some(&t.storage::<f32>()[at..at + n])
}

/// The elements of an f32 flex tensor that fills a span of its storage
/// densely in some order of its dimensions (contiguous, or permuted as a
/// transposed gradient is), in memory order.
pub(crate) fn dense_f32s(t: &FlexTensor) -> Option<&[f32]> {
    let layout = t.layout();
    if t.dtype() != DType::F32 {
        return None;
    }
    let mut dims: Vec<(isize, usize)> = layout
        .strides()
        .iter()
        .copied()
        .zip(layout.shape().iter().copied())
        .filter(|&(_, size)| size != 1)
        .collect();
    dims.sort_unstable();
    let mut expected = 1isize;
    for (stride, size) in dims {
        if stride != expected {
            return None;
        }
        expected = expected.checked_mul(size as isize)?;
    }
    let n = layout.num_elements();
    let at = layout.start_offset();
    t.storage::<f32>().get(at..at + n)
}

/// The tensor as a contiguous f32 flex tensor, copying only if needed.
pub(crate) fn contiguous(t: FlexTensor) -> Option<FlexTensor> {
    if t.dtype() != DType::F32 {
        return None;
    }
    Some(if t.is_contiguous() {
        t
    } else {
        t.to_contiguous()
    })
}

pub(crate) fn flex_tensor(values: Vec<f32>, shape: &[usize]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape.to_vec()))
}

/// A dense buffer of `values` read through `strides` (a permutation of
/// `shape`'s row-major layout).
pub(crate) fn laid_out(values: Vec<f32>, shape: &[usize], strides: &[isize]) -> FlexTensor {
    let layout = Layout::new(shape.to_vec().into(), strides.to_vec(), 0);
    flex_tensor(values, shape).with_layout(layout)
}

pub(crate) fn shape_of(t: &FlexTensor) -> Vec<usize> {
    t.layout().shape().iter().copied().collect()
}

/// The shape of an `N`-dimensional tensor.
pub(crate) fn dims<const N: usize>(t: &FlexTensor) -> [usize; N] {
    let s = t.layout().shape();
    std::array::from_fn(|i| s[i])
}

/// The first `N` axes in memory order, outermost first, by `strides`;
/// ties put longer axes first, then row-major order, so a size-1 axis
/// (whose stride means nothing) never splits the others.
pub(crate) fn axis_order<const N: usize>(shape: &[usize], strides: &[isize]) -> [usize; N] {
    let mut order = std::array::from_fn(|i| i);
    order.sort_by_key(|&a| std::cmp::Reverse((strides[a], usize::from(shape[a] > 1), N - a)));
    order
}

/// The strides of a dense `shape` whose axes lie in memory in `order`
/// (outermost first).
pub(crate) fn dense_strides<const N: usize>(shape: [usize; N], order: [usize; N]) -> [isize; N] {
    let mut strides = [0isize; N];
    let mut next = 1isize;
    for &axis in order.iter().rev() {
        strides[axis] = next;
        next *= shape[axis] as isize;
    }
    strides
}

/// A plain (not autodiff) flex tensor's primitive.
pub(crate) fn plain<const D: usize>(t: &Tensor<D>) -> Option<FlexTensor> {
    t.clone().try_into_primitive::<Flex>().ok()
}

/// A fused operation of `N` float operands on flex: its forward, and the
/// state its [`Backward`] keeps (only built when a gradient is needed).
pub(crate) trait Fused<const N: usize>: Backward<Flex, N> + Clone {
    fn forward(
        &self,
        operands: [FlexTensor; N],
        tracked: bool,
    ) -> (FlexTensor, Option<Self::State>);
}

/// Applies `op` to plain flex operands or to autodiff-on-flex ones (either
/// checkpointing strategy); `Err` gives the operands back elsewhere, for a
/// dtype other than f32, or with the kernels turned off.
pub(crate) fn apply<const N: usize, const D: usize, K: Fused<N>>(
    operands: [Tensor<D>; N],
    op: K,
) -> Result<Tensor<D>, [Tensor<D>; N]> {
    if !enabled() || operands.iter().any(|t| t.dtype() != DType::F32) {
        return Err(operands);
    }
    if let Some(plain) = try_all(&operands, |t| t.clone().try_into_primitive::<Flex>().ok()) {
        let (out, _) = op.forward(plain, false);
        return Ok(Tensor::from_primitive::<Flex>(out));
    }
    // one arm per strategy: Burn's dispatch converts only to these two
    macro_rules! tracked {
        ($c:ty) => {
            if let Some(auto) = try_all(&operands, |t| {
                t.clone().try_into_primitive::<Autodiff<Flex, $c>>().ok()
            }) {
                drop(operands);
                let mut guards = Vec::with_capacity(N);
                let mut prims = Vec::with_capacity(N);
                for a in auto {
                    let (p, g) = a.into_parts();
                    prims.push(p);
                    guards.push(g);
                }
                let prims: [FlexTensor; N] = prims.try_into().expect("N operands");
                let guards: [NodeGuard; N] = guards.try_into().expect("N operands");
                let kernel = op.clone();
                let out = match op.prepare::<$c>(guards).compute_bound().stateful() {
                    OpsKind::Tracked(prep) => {
                        let (y, state) = kernel.forward(prims, true);
                        prep.finish(state.expect("a tracked forward keeps its state"), y)
                    }
                    OpsKind::UnTracked(prep) => prep.finish(kernel.forward(prims, false).0),
                };
                return Ok(Tensor::from_primitive::<Autodiff<Flex, $c>>(out));
            }
        };
    }
    tracked!(NoCheckpointing);
    tracked!(BalancedCheckpointing);
    Err(operands)
}

fn try_all<T, U, const N: usize>(items: &[T; N], f: impl Fn(&T) -> Option<U>) -> Option<[U; N]> {
    let v: Option<Vec<U>> = items.iter().map(f).collect();
    v.and_then(|v| v.try_into().ok())
}

/// Lanes a reduction keeps apart, so that the compiler can vectorise it
/// (f32 addition is not reassociated otherwise).
pub(crate) const LANES: usize = 16;

/// `Σ f(a_i, b_i)` in [`LANES`] partial sums added in a fixed order.
#[inline(always)]
pub(crate) fn sum_pairs(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            lanes[i] += f(x[i], y[i]);
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(&x, &y)| f(x, y)).sum();
    lanes.iter().sum::<f32>() + tail
}

/// The largest element (`f32::MIN` for none), in [`LANES`] partial maxima.
#[inline(always)]
pub(crate) fn max_of(x: &[f32]) -> f32 {
    let mut lanes = [f32::MIN; LANES];
    let c = x.chunks_exact(LANES);
    let rest = c.remainder();
    for v in c {
        for i in 0..LANES {
            lanes[i] = lanes[i].max(v[i]);
        }
    }
    rest.iter().chain(&lanes).fold(f32::MIN, |m, &v| m.max(v))
}

/// A plain f32 tensor's elements on the host, without a copy when it is a
/// contiguous flex tensor (for kernels called from other crates).
pub struct HostF32(FlexTensor);

impl HostF32 {
    pub fn of<const D: usize>(t: &Tensor<D>) -> Option<Self> {
        if !enabled() {
            return None;
        }
        contiguous(plain(&t.clone().inner())?).map(Self)
    }

    pub fn values(&self) -> &[f32] {
        f32s(&self.0).expect("contiguous f32")
    }
}

/// A plain contiguous f32 flex tensor's elements to overwrite: its own
/// storage when nothing else holds it, a copy otherwise (copy on write), so
/// a tensor shared with another model is never changed under it.
pub struct OwnedF32(FlexTensor);

impl OwnedF32 {
    /// `Err` gives the tensor back when it is not a plain contiguous f32 flex
    /// tensor, or with the kernels turned off.
    pub fn of<const D: usize>(t: Tensor<D>) -> Result<Self, Box<Tensor<D>>> {
        if !Self::fits(&t) {
            return Err(Box::new(t));
        }
        Ok(Self(t.try_into_primitive::<Flex>().expect("checked above")))
    }

    /// Whether [`OwnedF32::of`] takes `t`.
    pub fn fits<const D: usize>(t: &Tensor<D>) -> bool {
        enabled() && plain(t).is_some_and(|p| f32s(&p).is_some())
    }

    pub fn values_mut(&mut self) -> &mut [f32] {
        let (at, n) = (
            self.0.layout().start_offset(),
            self.0.layout().num_elements(),
        );
        &mut self.0.storage_mut::<f32>()[at..at + n]
    }

    pub fn into_tensor<const D: usize>(self) -> Tensor<D> {
        Tensor::from_primitive::<Flex>(self.0)
    }
}

/// A plain flex tensor of these values.
pub fn flex_f32<const D: usize>(values: Vec<f32>, shape: [usize; D]) -> Tensor<D> {
    Tensor::from_primitive::<Flex>(flex_tensor(values, &shape))
}

#[cfg(test)]
mod tests {
    use crate::{Gemma2Config, Gemma2ForCausalLM, Padding, RandomInit, TokenBatch};
    use burn::tensor::Device;

    /// A small model's logits and its embedding's gradient (through every
    /// layer's backward) under the kernels' builds capped at `widest`.
    fn run(widest: u8) -> (Vec<f32>, Vec<f32>) {
        super::cap_build(widest);
        let device = Device::default().autodiff();
        let mut c = Gemma2Config::new(64, 32, 64, 2, 4, 2, 8, 16);
        c.max_position_embeddings = 32;
        let model = Gemma2ForCausalLM::new(&c, &mut RandomInit::new(7), &device).unwrap();
        let rows: Vec<Vec<u32>> = (0..3)
            .map(|r| (0..11).map(|i| (i * 5 + r * 3) % 64).collect())
            .collect();
        let batch = TokenBatch::new(&rows, 0, Padding::Right);
        let logits = model.forward(&batch);
        let grads = logits.clone().square().mean().backward();
        let grad = model.model.embed_tokens.weight.grad(&grads).unwrap();
        let flat = |d: burn::tensor::TensorData| d.iter::<f32>().collect::<Vec<_>>();
        super::cap_build(2);
        (flat(logits.inner().into_data()), flat(grad.into_data()))
    }

    #[test]
    fn the_baseline_and_the_vector_builds_give_the_same_bits() {
        let native = run(2);
        for widest in [1, 0] {
            let (logits, grad) = run(widest);
            assert!(
                logits
                    .iter()
                    .zip(&native.0)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "logits, build ≤ {widest}"
            );
            assert!(
                grad.iter()
                    .zip(&native.1)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "gradient, build ≤ {widest}"
            );
        }
        // the check can fail: another model gives other bits
        assert!(native.0.iter().any(|x| *x != 0.0));
    }
}
