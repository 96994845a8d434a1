//! Frozen matrices held in 8 or 4 bits (QLoRA, arXiv 2305.14314, in
//! bitsandbytes' layout): the tensor `[out, in]` flattened row-major, cut
//! into blocks of [`BLOCK`] consecutive elements, one f32 scale
//! `m = max|x|` per block (a short last block has its own).
//!
//! - nf4: the index of the nearest of the 16 values of [`NF4`] to `x / m`,
//!   two indices a byte (the first element in the high nibble);
//!   dequantized `NF4[i] · m`.
//! - int8: `q = round(x / (m / 127))` in f32, half away from zero, clamped
//!   to ±127; dequantized `q · (m / 127)`.
//!
//! An all-zero block dequantizes to zeros. Products never hold a whole
//! matrix in f32: rows are widened a block at a time, and a decoding step's
//! kernel reads the packed bytes directly ([`crate::skinny_matmul`]).

use std::sync::Arc;

use rayon::prelude::*;

pub const BLOCK: usize = 64;

/// The NF4 code book (QLoRA's Appendix E; bitsandbytes' table).
#[allow(clippy::excessive_precision)]
pub const NF4: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantFormat {
    Int8,
    Nf4,
}

impl QuantFormat {
    pub fn name(self) -> &'static str {
        match self {
            Self::Int8 => "int8",
            Self::Nf4 => "nf4",
        }
    }

    /// Bytes per element, scales included.
    pub fn bytes_per_element(self) -> f64 {
        let scale = 4.0 / BLOCK as f64;
        match self {
            Self::Int8 => 1.0 + scale,
            Self::Nf4 => 0.5 + scale,
        }
    }
}

/// A frozen `[rows, cols]` matrix in blocks of [`BLOCK`] elements.
#[derive(Clone)]
pub struct QuantMatrix {
    pub format: QuantFormat,
    pub rows: usize,
    pub cols: usize,
    /// int8: one signed byte an element; nf4: two indices a byte.
    pub data: Vec<u8>,
    /// What a block's stored values are multiplied by: nf4 `m`, int8 `m / 127`.
    pub scales: Vec<f32>,
}

impl std::fmt::Debug for QuantMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QuantMatrix({}, [{}, {}])",
            self.format.name(),
            self.rows,
            self.cols
        )
    }
}

/// The midpoints between neighbouring NF4 values.
const NF4_MIDS: [f32; 15] = {
    let mut m = [0f32; 15];
    let mut i = 0;
    while i < 15 {
        m[i] = (NF4[i] + NF4[i + 1]) / 2.0;
        i += 1;
    }
    m
};

/// The index of the nearest NF4 value to `v` in `[-1, 1]`: the number of
/// midpoints below it (a midpoint goes up, as bitsandbytes' comparisons
/// `v > midpoint` do), by binary search.
fn nf4_index(v: f32) -> u8 {
    let mut i = 0usize;
    for step in [8, 4, 2, 1] {
        if v > NF4_MIDS[i + step - 1] {
            i += step;
        }
    }
    i as u8
}

fn int8_of(v: f32, step: f32) -> u8 {
    if step == 0.0 {
        return 0;
    }
    ((v / step).round().clamp(-127.0, 127.0) as i8) as u8
}

/// Block `values` (at most [`BLOCK`] of them) into `out` (its bytes); returns
/// its scale.
fn quantize_block(format: QuantFormat, values: &[f32], out: &mut [u8]) -> f32 {
    let m = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    match format {
        QuantFormat::Int8 => {
            let step = m / 127.0;
            for (o, &v) in out.iter_mut().zip(values) {
                *o = int8_of(v, step);
            }
            step
        }
        QuantFormat::Nf4 => {
            let index = |v: f32| if m == 0.0 { 7 } else { nf4_index(v / m) };
            for (o, pair) in out.iter_mut().zip(values.chunks(2)) {
                let lo = pair.get(1).map_or(0, |&v| index(v));
                *o = (index(pair[0]) << 4) | lo;
            }
            m
        }
    }
}

impl QuantMatrix {
    pub fn quantize(format: QuantFormat, values: &[f32], [rows, cols]: [usize; 2]) -> Self {
        assert_eq!(values.len(), rows * cols, "{rows} x {cols} values");
        Self::from_blocks(format, [rows, cols], |from, out| {
            out.copy_from_slice(&values[from..from + out.len()])
        })
    }

    /// A `[rows, cols]` matrix quantized block by block on all cores, each
    /// block's values written into a buffer by `load(first element, buffer)`:
    /// no copy of the whole matrix in f32 exists.
    pub fn from_blocks(
        format: QuantFormat,
        [rows, cols]: [usize; 2],
        load: impl Fn(usize, &mut [f32]) + Sync,
    ) -> Self {
        /// Blocks a task quantizes.
        const GROUP: usize = 1024;
        let len = rows * cols;
        let per_block = match format {
            QuantFormat::Int8 => BLOCK,
            QuantFormat::Nf4 => BLOCK / 2,
        };
        let bytes = match format {
            QuantFormat::Int8 => len,
            QuantFormat::Nf4 => len.div_ceil(2),
        };
        let mut data = vec![0u8; bytes];
        let mut scales = vec![0f32; len.div_ceil(BLOCK)];
        data.par_chunks_mut(GROUP * per_block)
            .zip(scales.par_chunks_mut(GROUP))
            .enumerate()
            .for_each(|(g, (data, scales))| {
                let mut buf = [0f32; BLOCK];
                for (i, (out, scale)) in data.chunks_mut(per_block).zip(scales).enumerate() {
                    let from = (g * GROUP + i) * BLOCK;
                    let values = &mut buf[..BLOCK.min(len - from)];
                    load(from, values);
                    *scale = quantize_block(format, values, out);
                }
            });
        Self {
            format,
            rows,
            cols,
            data,
            scales,
        }
    }

    pub fn dims(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    /// Bytes held: packed values and scales.
    pub fn bytes(&self) -> usize {
        self.data.len() + 4 * self.scales.len()
    }

    /// Element `i` of the flattened matrix, dequantized.
    pub fn value(&self, i: usize) -> f32 {
        let m = self.scales[i / BLOCK];
        match self.format {
            QuantFormat::Int8 => (self.data[i] as i8) as f32 * m,
            QuantFormat::Nf4 => {
                let b = self.data[i / 2];
                NF4[usize::from(if i.is_multiple_of(2) { b >> 4 } else { b & 15 })] * m
            }
        }
    }

    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        self.dequantize_into(0, &mut out);
        out
    }

    /// Elements `from..from + out.len()` of the flattened matrix into `out`,
    /// on all cores.
    pub fn dequantize_into(&self, from: usize, out: &mut [f32]) {
        const GRAIN: usize = 1 << 15;
        out.par_chunks_mut(GRAIN)
            .enumerate()
            .for_each(|(c, o)| self.dequantize_serial(from + c * GRAIN, o));
    }

    fn dequantize_serial(&self, from: usize, out: &mut [f32]) {
        let mut i = 0;
        // whole aligned blocks through the vector loads of the decoding kernel
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            while !(from + i).is_multiple_of(BLOCK) && i < out.len() {
                out[i] = self.value(from + i);
                i += 1;
            }
            let whole = (out.len() - i) / BLOCK * BLOCK;
            // SAFETY: AVX2 is checked; `dequantize_blocks` reads whole
            // blocks `from + i ..` of this matrix and writes `whole` floats.
            unsafe { simd::dequantize_blocks(self, from + i, &mut out[i..i + whole]) };
            i += whole;
        }
        for (j, o) in out.iter_mut().enumerate().skip(i) {
            *o = self.value(from + j);
        }
    }

    /// Rows `start..start + len` in f32.
    pub fn rows_f32(&self, start: usize, len: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(len * self.cols);
        // SAFETY: every element is written by `dequantize_into` before use.
        #[allow(clippy::uninit_vec)]
        unsafe {
            out.set_len(len * self.cols)
        };
        self.dequantize_into(start * self.cols, &mut out);
        out
    }
}

/// A shared quantized matrix (models that share a frozen base share it).
pub type SharedQuant = Arc<QuantMatrix>;

/// Vector loads of 8 (AVX2) or 16 (AVX-512F) consecutive dequantized
/// elements that lie in one block; the same products as [`QuantMatrix::value`],
/// so every path gives the same bits.
#[cfg(target_arch = "x86_64")]
pub(crate) mod simd {
    use std::arch::x86_64::*;

    use super::{BLOCK, NF4, QuantFormat, QuantMatrix};

    /// Eight int8 values at `p` times `step`.
    ///
    /// # Safety
    /// AVX2 is available and `p` points to eight readable bytes.
    #[inline(always)]
    pub unsafe fn int8x8(p: *const u8, step: f32) -> __m256 {
        unsafe {
            let q = _mm_loadl_epi64(p as *const __m128i);
            _mm256_mul_ps(
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)),
                _mm256_set1_ps(step),
            )
        }
    }

    /// Sixteen int8 values at `p` times `step`.
    ///
    /// # Safety
    /// AVX-512F is available and `p` points to sixteen readable bytes.
    #[inline(always)]
    pub unsafe fn int8x16(p: *const u8, step: f32) -> __m512 {
        unsafe {
            let q = _mm_loadu_si128(p as *const __m128i);
            _mm512_mul_ps(
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)),
                _mm512_set1_ps(step),
            )
        }
    }

    /// Eight NF4 values packed in the four bytes at `p` times `scale`.
    ///
    /// # Safety
    /// AVX2 is available and `p` points to four readable bytes.
    #[inline(always)]
    pub unsafe fn nf4x8(p: *const u8, scale: f32) -> __m256 {
        unsafe {
            let bytes = _mm_cvtsi32_si128((p as *const i32).read_unaligned());
            // each byte twice: high nibble first
            let pairs = _mm_unpacklo_epi8(bytes, bytes);
            let wide = _mm256_cvtepu8_epi32(pairs);
            let shifted = _mm256_srlv_epi32(wide, _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0));
            let idx = _mm256_and_si256(shifted, _mm256_set1_epi32(15));
            let lo = _mm256_loadu_ps(NF4.as_ptr());
            let hi = _mm256_loadu_ps(NF4.as_ptr().add(8));
            let from_lo = _mm256_permutevar8x32_ps(lo, idx);
            let from_hi = _mm256_permutevar8x32_ps(hi, idx);
            let upper = _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, _mm256_set1_epi32(7)));
            let code = _mm256_blendv_ps(from_lo, from_hi, upper);
            _mm256_mul_ps(code, _mm256_set1_ps(scale))
        }
    }

    /// Sixteen NF4 values packed in the eight bytes at `p` times `scale`.
    ///
    /// # Safety
    /// AVX-512F is available and `p` points to eight readable bytes.
    #[inline(always)]
    pub unsafe fn nf4x16(p: *const u8, scale: f32) -> __m512 {
        unsafe {
            let bytes = _mm_loadl_epi64(p as *const __m128i);
            let pairs = _mm_unpacklo_epi8(bytes, bytes);
            let wide = _mm512_cvtepu8_epi32(pairs);
            let shifts = _mm512_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
            let idx = _mm512_and_si512(_mm512_srlv_epi32(wide, shifts), _mm512_set1_epi32(15));
            let code = _mm512_permutexvar_ps(idx, _mm512_loadu_ps(NF4.as_ptr()));
            _mm512_mul_ps(code, _mm512_set1_ps(scale))
        }
    }

    /// Whole blocks from element `from` (a multiple of [`BLOCK`]).
    ///
    /// # Safety
    /// AVX2 is available; `out.len()` is a multiple of [`BLOCK`] and the
    /// blocks lie within `q`.
    #[target_feature(enable = "avx2")]
    pub unsafe fn dequantize_blocks(q: &QuantMatrix, from: usize, out: &mut [f32]) {
        debug_assert!(from.is_multiple_of(BLOCK) && out.len().is_multiple_of(BLOCK));
        debug_assert!(from + out.len() <= q.rows * q.cols);
        for (b, o) in out.chunks_exact_mut(BLOCK).enumerate() {
            let at = from + b * BLOCK;
            let m = q.scales[at / BLOCK];
            for e in (0..BLOCK).step_by(8) {
                // SAFETY: the block lies within `q` (the caller's contract)
                // and `o` holds `BLOCK` floats.
                unsafe {
                    let v = match q.format {
                        QuantFormat::Int8 => int8x8(q.data.as_ptr().add(at + e), m),
                        QuantFormat::Nf4 => nf4x8(q.data.as_ptr().add((at + e) / 2), m),
                    };
                    _mm256_storeu_ps(o.as_mut_ptr().add(e), v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two blocks and a short one of 3: values, an all-zero block, and the
    /// scale of the short block its own.
    fn sample() -> Vec<f32> {
        let mut v: Vec<f32> = (0..BLOCK).map(|i| (i as f32 - 31.5) / 8.0).collect();
        v.extend(std::iter::repeat_n(0.0, BLOCK));
        v.extend([127.0, -2.5, 0.5]);
        v
    }

    #[test]
    fn int8_by_hand() {
        let v = sample();
        let q = QuantMatrix::quantize(QuantFormat::Int8, &v, [1, v.len()]);
        assert_eq!(q.scales, [3.9375 / 127.0, 0.0, 1.0]);
        let step = 3.9375f32 / 127.0;
        // -31.5/8 = -3.9375 → -127; 0.5/8 = 0.0625 → round(2.016) = 2
        assert_eq!(q.data[0] as i8, -127);
        assert_eq!(q.data[32] as i8, 2);
        assert_eq!(q.value(32), 2.0 * step);
        // the short block, step 1: -2.5 → -3 and 0.5 → 1 (half away from zero)
        assert_eq!(q.data[2 * BLOCK..], [127u8, (-3i8) as u8, 1]);
        let d = q.dequantize();
        assert!(d[BLOCK..2 * BLOCK].iter().all(|&x| x == 0.0));
        assert_eq!(d[2 * BLOCK..], [127.0, -3.0, 1.0]);
        for (a, b) in v[..2 * BLOCK].iter().zip(&d) {
            assert!((a - b).abs() <= step / 2.0 + 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn nf4_by_hand() {
        let v = sample();
        let q = QuantMatrix::quantize(QuantFormat::Nf4, &v, [1, v.len()]);
        assert_eq!(q.data.len(), v.len().div_ceil(2));
        // -3.9375 / 3.9375 = -1 → index 0; -3.8125/3.9375 = -0.968 → 0;
        // element 32: 0.0625/3.9375 = 0.0159 → nearest 0 (index 7)
        assert_eq!(q.data[0], 0x00);
        assert_eq!(q.data[16] >> 4, 7);
        // element 63: 1 → 15; element 62: 0.968 → 15
        assert_eq!(q.data[31], 0xff);
        // the zero block: index 7 everywhere, dequantized 0
        assert!(q.data[BLOCK / 2..BLOCK].iter().all(|&b| b == 0x77));
        // short block, m = 127: 1 → 15, -0.0197 and 0.0039 → 7 (zero)
        assert_eq!(q.data[BLOCK..], [0xf7, 0x70]);
        let d = q.dequantize();
        assert_eq!(d[2 * BLOCK..], [127.0, 0.0, 0.0]);
        // a block of its own: -0.5 → 2 (-0.525 is nearest), 0.25 → 10
        let q = QuantMatrix::quantize(QuantFormat::Nf4, &[1.0, -0.5, 0.25], [3, 1]);
        assert_eq!(q.data, [0xf2, 0xa0]);
        assert_eq!(q.dequantize(), [1.0, NF4[2], NF4[10]]);
        assert!(d[BLOCK..2 * BLOCK].iter().all(|&x| x == 0.0));
        assert_eq!(d[32], 0.0);
    }

    #[test]
    fn nearest_code_and_midpoints() {
        // the binary search counts the midpoints below, as a scan does
        for i in -1100..=1100 {
            let v = i as f32 / 1000.0;
            let scan = NF4_MIDS.iter().filter(|&&m| v > m).count();
            assert_eq!(nf4_index(v) as usize, scan, "{v}");
        }
        for (i, &c) in NF4.iter().enumerate() {
            assert_eq!(nf4_index(c) as usize, i);
        }
        let mid = (NF4[7] + NF4[8]) / 2.0;
        assert_eq!(nf4_index(mid), 7);
        assert_eq!(nf4_index(f32::from_bits(mid.to_bits() + 1)), 8);
    }

    /// The vector path (whole blocks) and the element path give the same
    /// bits, from any starting element.
    #[test]
    fn every_path_gives_the_same_bits() {
        let v: Vec<f32> = (0..BLOCK * 37 + 5)
            .map(|i| ((i * 7919) % 1000) as f32 / 250.0 - 2.0)
            .collect();
        for format in [QuantFormat::Int8, QuantFormat::Nf4] {
            let q = QuantMatrix::quantize(format, &v, [1, v.len()]);
            let each: Vec<f32> = (0..v.len()).map(|i| q.value(i)).collect();
            assert_eq!(q.dequantize(), each);
            let mut part = vec![0.0; 1000];
            q.dequantize_into(70, &mut part);
            assert_eq!(part, each[70..1070]);
        }
    }
}
