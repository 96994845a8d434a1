//! A padded batch of token ids, and what the model derives from it: position
//! ids (pads do not advance the position, as in `transformers`' generate) and
//! the attention masks.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

#[derive(Debug, Clone, PartialEq)]
pub struct TokenBatch {
    pub batch: usize,
    pub len: usize,
    /// Row-major `[batch, len]`.
    pub ids: Vec<u32>,
    /// `false` where the id is padding.
    pub valid: Vec<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    Left,
    Right,
}

static LENGTH_MULTIPLE: AtomicUsize = AtomicUsize::new(1);
static SHAPES: Mutex<BTreeSet<(usize, usize)>> = Mutex::new(BTreeSet::new());

/// Pads every batch made by [`TokenBatch::new`] from now on to a multiple of
/// `n` tokens: GPU backends compile (and autotune) kernels per shape, and a
/// few lengths bound how many. Padding is masked, so results do not change.
pub fn pad_lengths_to(n: usize) {
    LENGTH_MULTIPLE.store(n.max(1), Ordering::SeqCst);
}

/// How many distinct `[batch, len]` shapes [`TokenBatch::new`] has made.
pub fn distinct_shapes() -> usize {
    SHAPES.lock().unwrap_or_else(|e| e.into_inner()).len()
}

impl TokenBatch {
    pub fn new(rows: &[Vec<u32>], pad_id: u32, padding: Padding) -> Self {
        let longest = rows.iter().map(Vec::len).max().unwrap_or(0);
        let len = longest.next_multiple_of(LENGTH_MULTIPLE.load(Ordering::SeqCst));
        SHAPES
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((rows.len(), len));
        let mut ids = Vec::with_capacity(rows.len() * len);
        let mut valid = Vec::with_capacity(rows.len() * len);
        for row in rows {
            let pad = len - row.len();
            if padding == Padding::Left {
                ids.extend(std::iter::repeat_n(pad_id, pad));
                valid.extend(std::iter::repeat_n(false, pad));
            }
            ids.extend_from_slice(row);
            valid.extend(std::iter::repeat_n(true, row.len()));
            if padding == Padding::Right {
                ids.extend(std::iter::repeat_n(pad_id, pad));
                valid.extend(std::iter::repeat_n(false, pad));
            }
        }
        Self {
            batch: rows.len(),
            len,
            ids,
            valid,
        }
    }

    /// Rows of equal length, no padding.
    pub fn dense(ids: Vec<u32>, batch: usize, len: usize) -> Self {
        assert_eq!(ids.len(), batch * len, "ids must be [batch, len]");
        Self {
            batch,
            len,
            valid: vec![true; ids.len()],
            ids,
        }
    }

    pub fn has_padding(&self) -> bool {
        self.valid.iter().any(|v| !v)
    }

    pub fn row(&self, b: usize) -> &[u32] {
        &self.ids[b * self.len..(b + 1) * self.len]
    }

    pub fn row_valid(&self, b: usize) -> &[bool] {
        &self.valid[b * self.len..(b + 1) * self.len]
    }

    /// Column of each row's last real token.
    pub fn last_valid(&self) -> Vec<usize> {
        (0..self.batch)
            .map(|b| {
                self.row_valid(b)
                    .iter()
                    .rposition(|&v| v)
                    .unwrap_or(self.len.saturating_sub(1))
            })
            .collect()
    }

    pub fn ids_tensor(&self, device: &Device) -> Tensor<2, Int> {
        let ids: Vec<i64> = self.ids.iter().map(|&x| x as i64).collect();
        Tensor::from_data(TensorData::new(ids, [self.batch, self.len]), device)
    }
}

/// Which keys a query may see: causal, within the window on sliding layers,
/// never a pad key. A pad query sees only itself, so no softmax row is empty.
pub(crate) struct MaskSpec<'a> {
    /// `valid[b]` covers every column from 0 to the last query column.
    pub valid: &'a [Vec<bool>],
    pub q_start: usize,
    pub q_len: usize,
    pub k_start: usize,
    pub window: Option<usize>,
}

impl MaskSpec<'_> {
    pub fn needed(&self) -> bool {
        let k_end = self.q_start + self.q_len;
        let window_bites = self
            .window
            .is_some_and(|w| self.q_start + self.q_len > self.k_start + w);
        window_bites
            || self.q_len != k_end - self.k_start
            || self
                .valid
                .iter()
                .any(|row| row[self.k_start..k_end].iter().any(|v| !v))
    }

    /// Row-major `[batch, q_len, k_len]`, `true` = masked.
    fn masked(&self) -> Vec<bool> {
        let k_end = self.q_start + self.q_len;
        let k_len = k_end - self.k_start;
        let mut out = Vec::with_capacity(self.valid.len() * self.q_len * k_len);
        for row in self.valid {
            for q in self.q_start..k_end {
                for k in self.k_start..k_end {
                    let visible = if row[q] {
                        row[k] && k <= q && self.window.is_none_or(|w| q - k < w)
                    } else {
                        k == q
                    };
                    out.push(!visible);
                }
            }
        }
        out
    }

    fn shape(&self) -> [usize; 4] {
        let k_len = self.q_start + self.q_len - self.k_start;
        [self.valid.len(), 1, self.q_len, k_len]
    }

    /// `[batch, 1, q_len, k_len]`, `true` = masked.
    pub fn build(&self, device: &Device) -> Tensor<4, Bool> {
        Tensor::from_data(TensorData::new(self.masked(), self.shape()), device)
    }

    /// The same mask as an additive bias: 0 where visible, the most negative
    /// float where masked (as `transformers` builds it).
    pub fn bias(&self, device: &Device) -> Tensor<4> {
        let bias: Vec<f32> = self
            .masked()
            .into_iter()
            .map(|m| if m { f32::MIN } else { 0.0 })
            .collect();
        Tensor::from_data(TensorData::new(bias, self.shape()), device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_sides() {
        let rows = vec![vec![5, 6, 7], vec![8]];
        let l = TokenBatch::new(&rows, 0, Padding::Left);
        assert_eq!(l.ids, vec![5, 6, 7, 0, 0, 8]);
        assert_eq!(l.last_valid(), vec![2, 2]);
        let r = TokenBatch::new(&rows, 0, Padding::Right);
        assert_eq!(r.ids, vec![5, 6, 7, 8, 0, 0]);
        assert_eq!(r.last_valid(), vec![2, 0]);
        assert!(r.has_padding());
    }

    fn mask_rows(spec: &MaskSpec) -> Vec<bool> {
        spec.build(&Device::default())
            .into_data()
            .try_into_vec::<bool>()
            .unwrap()
    }

    #[test]
    fn sliding_causal_mask_with_left_pad() {
        let valid = vec![vec![false, true, true, true]];
        let spec = MaskSpec {
            valid: &valid,
            q_start: 0,
            q_len: 4,
            k_start: 0,
            window: Some(2),
        };
        assert!(spec.needed());
        #[rustfmt::skip]
        let expected = vec![
            false, true, true, true,   // pad query sees itself
            true, false, true, true,
            true, false, false, true,
            true, true, false, false,  // window 2: keys 2 and 3
        ];
        assert_eq!(mask_rows(&spec), expected);
    }

    #[test]
    fn plain_causal_needs_no_mask() {
        let valid = vec![vec![true; 4]];
        let spec = MaskSpec {
            valid: &valid,
            q_start: 0,
            q_len: 4,
            k_start: 0,
            window: Some(8),
        };
        assert!(!spec.needed());
    }
}
