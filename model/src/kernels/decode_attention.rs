//! Attention of a decoding step (one new column per row) over the KV
//! cache, reading the keys and values where the cache holds them: columns
//! of a buffer with room for more, a strided view that Burn's `flex`
//! attention would first copy whole, every layer and every step.
//!
//! Per row and key/value head `h`, with `Q` the query heads that share `h`:
//! `S = Q·Kₕᵀ` (one gemm), `s ← s·scale`, `s ← cap·tanh(s / cap)`, masked
//! columns `−∞`, a softmax per row of `S`, then `S·Vₕ` (one gemm): the same
//! gemm calls and the same loop as Burn's naive attention, so the same bits.

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::tensor::{Bool, Tensor};
use rayon::prelude::*;

use super::linear::{Strided, write_product};

/// Burn's naive attention runs up to this many scores per head.
const NAIVE_SCORES: usize = 256 * 1024;

type Operands = (Tensor<4>, Tensor<4>, Tensor<4>, Option<Tensor<4, Bool>>);

/// A `[batch, heads, columns, head_dim]` view whose columns lie `head_dim`
/// apart and whose elements within a column are adjacent.
struct Heads<'a> {
    data: &'a [f32],
    offset: usize,
    strides: [usize; 2],
}

impl Heads<'_> {
    fn of(t: &FlexTensor, head_dim: usize) -> Option<Heads<'_>> {
        let layout = t.layout();
        let s = layout.strides();
        if t.dtype() != burn::tensor::DType::F32
            || s.iter().any(|&s| s < 0)
            || s[3] != 1
            || s[2] != head_dim as isize
        {
            return None;
        }
        Some(Heads {
            data: t.storage::<f32>(),
            offset: layout.start_offset(),
            strides: [s[0] as usize, s[1] as usize],
        })
    }

    /// The `columns × head_dim` matrix of row `b`, head `h`.
    fn matrix(&self, b: usize, h: usize, columns: usize, head_dim: usize) -> &[f32] {
        let at = self.offset + b * self.strides[0] + h * self.strides[1];
        &self.data[at..at + columns * head_dim]
    }
}

/// `q: [batch, kv_heads, group, head_dim]` (the query heads of each
/// key/value head) against `k`, `v: [batch, kv_heads, columns, head_dim]`,
/// with `mask: [batch, 1, 1, columns]` (`true` = masked); `Err` gives the
/// operands back where this does not apply.
pub fn decode_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: Option<Tensor<4, Bool>>,
    scale: f64,
    softcap: Option<f64>,
) -> Result<Tensor<4>, Box<Operands>> {
    let [b, heads, group, d] = q.dims();
    let columns = k.dims()[2];
    let fits = super::enabled()
        && k.dims() == [b, heads, columns, d]
        && v.dims() == k.dims()
        && mask.as_ref().is_none_or(|m| m.dims() == [b, 1, 1, columns])
        && group * columns <= NAIVE_SCORES
        && columns > 0;
    let plain = fits
        .then(|| Some((super::plain(&q)?, super::plain(&k)?, super::plain(&v)?)))
        .flatten();
    let Some((tq, tk, tv)) = plain else {
        return Err(Box::new((q, k, v, mask)));
    };
    let (Some(tq), Some(keys), Some(values)) =
        (super::contiguous(tq), Heads::of(&tk, d), Heads::of(&tv, d))
    else {
        return Err(Box::new((q, k, v, mask)));
    };
    let queries = super::f32s(&tq).expect("contiguous f32");
    let masked: Option<Vec<bool>> =
        mask.map(|m| m.into_data().try_to_vec::<bool>().expect("a bool mask"));
    let (scale, softcap) = (scale as f32, softcap.map(|c| c as f32));
    let mut out = vec![0.0f32; b * heads * group * d];
    let run = |scores: &mut Vec<f32>, (i, o): (usize, &mut [f32])| {
        let (row, h) = (i / heads, i % heads);
        let q = &queries[i * group * d..(i + 1) * group * d];
        let (k, v) = (
            keys.matrix(row, h, columns, d),
            values.matrix(row, h, columns, d),
        );
        let mask = masked
            .as_ref()
            .map(|m| &m[row * columns..(row + 1) * columns]);
        one_head(
            q,
            k,
            v,
            o,
            scores,
            [group, columns, d],
            scale,
            softcap,
            mask,
        );
    };
    out.par_chunks_exact_mut(group * d)
        .enumerate()
        .for_each_init(|| vec![0.0f32; group * columns], run);
    Ok(Tensor::from_primitive::<Flex>(super::flex_tensor(
        out,
        &[b, heads, group, d],
    )))
}

/// One head's `softmax(capped(q·kᵀ·scale), masked)·v` into `out`.
#[allow(clippy::too_many_arguments)]
fn one_head(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    scores: &mut [f32],
    [group, columns, d]: [usize; 3],
    scale: f32,
    softcap: Option<f32>,
    mask: Option<&[bool]>,
) {
    // SAFETY: `scores` is `group × columns`, `q` is `group × d` and `k`,
    // `v` are `columns × d`, all row-major, as the strides say; one thread
    // writes `scores` and `out`.
    unsafe {
        write_product(
            [group, columns, d],
            scores.as_mut_ptr(),
            [columns as isize, 1],
            Strided {
                ptr: q.as_ptr(),
                rs: d as isize,
                cs: 1,
            },
            Strided {
                ptr: k.as_ptr(),
                rs: 1,
                cs: d as isize,
            },
            gemm::Parallelism::None,
        );
    }
    for row in scores.chunks_exact_mut(columns) {
        let mut max = f32::NEG_INFINITY;
        for (j, s) in row.iter_mut().enumerate() {
            let mut val = *s * scale;
            if let Some(cap) = softcap {
                val = cap * (val / cap).tanh();
            }
            if mask.is_some_and(|m| m[j]) {
                val = f32::NEG_INFINITY;
            }
            *s = val;
            if val > max {
                max = val;
            }
        }
        if max == f32::NEG_INFINITY {
            row.fill(0.0);
            continue;
        }
        let mut sum = 0.0f32;
        for s in row.iter_mut() {
            let e = (*s - max).exp();
            *s = e;
            sum += e;
        }
        let inv = 1.0 / sum;
        for s in row.iter_mut() {
            *s *= inv;
        }
    }
    // SAFETY: as above; `out` is `group × d`.
    unsafe {
        write_product(
            [group, d, columns],
            out.as_mut_ptr(),
            [d as isize, 1],
            Strided {
                ptr: scores.as_ptr(),
                rs: columns as isize,
                cs: 1,
            },
            Strided {
                ptr: v.as_ptr(),
                rs: d as isize,
                cs: 1,
            },
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::random;
    use burn::tensor::module::attention;
    use burn::tensor::ops::AttentionModuleOptions;
    use burn::tensor::{Device, TensorData};

    fn values(t: Tensor<4>) -> Vec<f32> {
        t.into_data().iter::<f32>().collect()
    }

    /// Columns `start..start + n` of a `[b, h, capacity, d]` buffer: the
    /// view a KV cache hands to attention.
    fn view(buffer: &Tensor<4>, start: usize, n: usize) -> Tensor<4> {
        buffer.clone().narrow(2, start, n)
    }

    #[test]
    fn equals_burns_attention_bit_for_bit_on_cache_views() {
        let device = Device::default();
        for (b, h, g, d, capacity, start, n, softcap) in [
            (8, 2, 2, 64, 130, 0, 17, Some(50.0)),
            (8, 4, 2, 64, 160, 3, 80, Some(50.0)),
            (3, 1, 4, 32, 40, 5, 1, None),
            (2, 2, 1, 16, 64, 0, 64, Some(1.5)),
        ] {
            let q = random([b, h, g, d], 1.0, 1);
            let kb = random([b, h, capacity, d], 3.0, 2);
            let vb = random([b, h, capacity, d], 1.0, 3);
            let (k, v) = (view(&kb, start, n), view(&vb, start, n));
            // row 0 fully masked, the others every third column
            let m: Vec<bool> = (0..b * n).map(|i| i < n || i % 3 == 1).collect();
            let mask = Tensor::<4, Bool>::from_data(TensorData::new(m, [b, 1, 1, n]), &device);
            let scale = (d as f64).powf(-0.5);
            for mask in [None, Some(mask)] {
                let options = AttentionModuleOptions {
                    scale: Some(scale),
                    softcap,
                    is_causal: false,
                };
                let want = attention(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    mask.clone().map(|m| m.expand([b, h, g, n])),
                    None,
                    options,
                );
                let got = decode_attention(q.clone(), k.clone(), v.clone(), mask, scale, softcap)
                    .unwrap_or_else(|_| panic!("a cache view on flex"));
                assert_eq!(got.dims(), [b, h, g, d]);
                assert_eq!(values(got), values(want), "{b} {h} {g} {d} {start} {n}");
            }
        }
    }

    #[test]
    fn by_hand_and_handed_back() {
        let device = Device::default();
        // one head, one query, two columns: scores 0 and ln 3 → weights ¼, ¾
        let q = Tensor::<4>::from_data(TensorData::new(vec![1.0f32, 0.0], [1, 1, 1, 2]), &device);
        let k = Tensor::<4>::from_data(
            TensorData::new(vec![0.0f32, 0.0, 3f32.ln(), 0.0], [1, 1, 2, 2]),
            &device,
        );
        let v = Tensor::<4>::from_data(
            TensorData::new(vec![4.0f32, 0.0, 8.0, 4.0], [1, 1, 2, 2]),
            &device,
        );
        let got =
            values(decode_attention(q.clone(), k.clone(), v.clone(), None, 1.0, None).unwrap());
        assert!(
            (got[0] - 7.0).abs() < 1e-5 && (got[1] - 3.0).abs() < 1e-5,
            "{got:?}"
        );
        // columns not head_dim apart (a transposed cache): handed back
        let kt = k.clone().swap_dims(2, 3);
        assert!(decode_attention(q, kt, v, None, 1.0, None).is_err());
    }
}
