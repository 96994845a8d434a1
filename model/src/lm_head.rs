//! The tied LM head over only the positions a loss reads, a chunk of rows
//! at a time, so that `[batch, len, vocab]` logits and their gradient never
//! exist at once (at a 256k vocabulary one row of logits is 1 MB).
//!
//! A loss that is a sum of per-position terms `u_q = g(z_q)` of the
//! soft-capped logits `z_q = softcap(h_q·Eᵀ)` gets its gradient chunk by
//! chunk: each chunk's `z` is built on a detached copy of its hidden rows,
//! `g` runs, and the chunk's own backward gives `J_q = ∂u_q/∂h_q` (row `q`
//! of `u` depends only on row `q` of `h`). The chunk's graph is then dropped.
//! The returned `u` is `value + Σ_h h_q·J_q − (same, detached)`: the value
//! of `g`, with the gradient `J_q · ∂L/∂u_q` for any loss `L(u)` built on it
//! (sums, means, DPO's sigmoid of sums alike).
//!
//! When the head's weight itself trains (full fine-tuning of the tied
//! embedding) its gradient is not row-local, so the selected rows go through
//! the head in one piece inside the graph: still only the rows a loss reads.

use std::ops::Range;

use burn::tensor::{Int, Tensor, TensorData};

use crate::gemma2::Gemma2ForCausalLM;
use crate::layers::soft_cap;
use crate::skinny_matmul::matmul_transposed;
use crate::tokens::TokenBatch;

/// Logit elements per chunk by default: 16M floats, 64 rows at a 256k
/// vocabulary (`Gemma2ForCausalLM::head_chunk_elements`).
pub const CHUNK_ELEMENTS: usize = 1 << 24;

/// The `[batch, len − 1]` slots a loss reads (flat `r·(len − 1) + c`, slot
/// `(r, c)` predicting token `c + 1` of row `r` from hidden row `r·len + c`).
#[derive(Debug, Clone, PartialEq)]
pub struct Slots {
    pub flat: Vec<usize>,
    len: usize,
}

impl Slots {
    /// The slots with a non-zero weight in `weights` (`[batch·(len − 1)]`).
    pub fn nonzero(weights: &[f32], batch: &TokenBatch) -> Self {
        assert_eq!(weights.len(), batch.batch * (batch.len - 1));
        Self {
            flat: (0..weights.len()).filter(|&i| weights[i] != 0.0).collect(),
            len: batch.len,
        }
    }

    pub fn len(&self) -> usize {
        self.flat.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flat.is_empty()
    }

    /// The hidden row of each slot.
    fn hidden_rows(&self) -> Vec<i64> {
        let per_row = self.len - 1;
        self.flat
            .iter()
            .map(|&q| ((q / per_row) * self.len + q % per_row) as i64)
            .collect()
    }

    /// The next-token id each slot predicts.
    pub fn targets(&self, batch: &TokenBatch) -> Vec<u32> {
        let per_row = self.len - 1;
        self.flat
            .iter()
            .map(|&q| batch.row(q / per_row)[q % per_row + 1])
            .collect()
    }

    /// Rows of a per-slot tensor `[batch·(len − 1), …]` at these slots.
    pub fn select<const D: usize, K: burn::tensor::kind::Basic>(
        &self,
        x: Tensor<D, K>,
    ) -> Tensor<D, K> {
        let device = x.device();
        let idx: Vec<i64> = self.flat.iter().map(|&q| q as i64).collect();
        let n = idx.len();
        x.select(
            0,
            Tensor::<1, Int>::from_data(TensorData::new(idx, [n]), &device),
        )
    }

    /// Per-slot values `[n]` back at their positions, `[batch, len − 1]`
    /// (0 elsewhere; differentiable in `values`).
    pub fn spread(&self, values: Tensor<1>, batch: usize) -> Tensor<2> {
        let device = values.device();
        let idx: Vec<i64> = self.flat.iter().map(|&q| q as i64).collect();
        let n = idx.len();
        let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [n]), &device.clone().inner());
        Tensor::<1>::zeros([batch * (self.len - 1)], &device)
            .select_assign(0, idx, values, burn::tensor::IndexingUpdateOp::Add)
            .reshape([batch, self.len - 1])
    }
}

/// What `g` returns for a chunk of `m` rows: the per-row term that carries
/// the gradient, and per-row values reported beside it (no gradient).
pub struct RowTerms {
    pub grad: Tensor<1>,
    pub values: Vec<Tensor<1>>,
}

/// [`RowTerms`] of all rows, `[n]` each; `grad` differentiable in the
/// hidden states (and the head weight when it trains).
pub struct HeadOutput {
    pub grad: Tensor<1>,
    pub values: Vec<Tensor<1>>,
}

impl Gemma2ForCausalLM {
    /// Whether the tied head's weight takes gradients (full fine-tuning).
    pub fn head_trains(&self) -> bool {
        self.model.embed_tokens.weight.is_require_grad()
    }

    /// Whether losses over `batch` go through the chunked head: the head is
    /// frozen and the whole logits would exceed one chunk. Otherwise the
    /// logits of every position are formed at once, as in a plain forward.
    pub fn chunks_head(&self, batch: &TokenBatch) -> bool {
        !self.head_trains()
            && batch.batch * batch.len * self.vocab_size() > self.head_chunk_elements
    }

    /// The hidden states `[n, hidden]` that predict `slots`.
    pub fn slot_hidden(&self, hidden: Tensor<3>, slots: &Slots) -> Tensor<2> {
        let [b, t, h] = hidden.dims();
        let device = hidden.device();
        let rows = slots.hidden_rows();
        let n = rows.len();
        hidden.reshape([b * t, h]).select(
            0,
            Tensor::<1, Int>::from_data(TensorData::new(rows, [n]), &device),
        )
    }

    /// Soft-capped logits `[1, m, vocab]` of hidden rows `[m, hidden]`.
    pub fn row_logits(&self, rows: Tensor<2>) -> Tensor<3> {
        let m = rows.dims()[0];
        let w = self.model.embed_tokens.weight.val();
        let v = w.dims()[0];
        soft_cap(matmul_transposed(rows, w), self.final_softcap).reshape([1, m, v])
    }

    /// Rows per chunk at this vocabulary.
    pub fn head_chunk(&self) -> usize {
        (self.head_chunk_elements / self.vocab_size()).max(1)
    }

    /// `g` on the logits of `rows` (`[n, hidden]`), `chunk` rows at a time;
    /// `g` gets the chunk's `[1, m, vocab]` logits and its row range.
    pub fn head_terms(
        &self,
        rows: Tensor<2>,
        chunk: usize,
        mut g: impl FnMut(Tensor<3>, Range<usize>) -> RowTerms,
    ) -> HeadOutput {
        let n = rows.dims()[0];
        let weight_trains = self.model.embed_tokens.weight.is_require_grad();
        if weight_trains && rows.is_tracked() {
            let RowTerms { grad, values } = g(self.row_logits(rows), 0..n);
            return HeadOutput { grad, values };
        }
        let tracked = rows.is_autodiff() && rows.is_tracked();
        let detached = rows.clone().detach();
        let (mut grads, mut jacobians) = (Vec::new(), Vec::new());
        let mut values: Vec<Vec<Tensor<1>>> = Vec::new();
        for start in (0..n).step_by(chunk.max(1)) {
            let end = (start + chunk.max(1)).min(n);
            let part = detached.clone().narrow(0, start, end - start);
            let part = if tracked { part.require_grad() } else { part };
            let terms = g(self.row_logits(part.clone()), start..end);
            if values.is_empty() {
                values = vec![Vec::new(); terms.values.len()];
            }
            for (acc, v) in values.iter_mut().zip(terms.values) {
                acc.push(v.inner());
            }
            grads.push(terms.grad.clone().inner());
            if tracked {
                let tape = terms.grad.sum().backward();
                jacobians.push(part.grad(&tape).expect("the chunk's rows are tracked"));
            }
        }
        let cat = |parts: Vec<Tensor<1>>| -> Tensor<1> {
            if parts.is_empty() {
                Tensor::zeros([0], &rows.device().inner())
            } else {
                Tensor::cat(parts, 0)
            }
        };
        let value = cat(grads);
        let values = values.into_iter().map(cat).collect();
        if !tracked {
            return HeadOutput {
                grad: value,
                values,
            };
        }
        // constants on the rows' own device (autodiff and its checkpointing strategy)
        let device = rows.device();
        let jacobian = crate::on_autodiff(Tensor::cat(jacobians, 0), &device);
        let linear = (rows * jacobian).sum_dim(1).reshape([n]);
        let grad = crate::on_autodiff(value, &device) + linear.clone() - linear.detach();
        HeadOutput { grad, values }
    }

    /// `log p(target)` of every slot, `[n]`, through [`Self::head_terms`].
    pub fn slot_logprobs(&self, hidden: Tensor<3>, slots: &Slots, batch: &TokenBatch) -> Tensor<1> {
        let rows = self.slot_hidden(hidden, slots);
        let targets = target_ids(slots, batch, &rows.device());
        self.head_terms(rows, self.head_chunk(), |z, range| RowTerms {
            grad: target_logprobs(z, targets.clone().narrow(0, range.start, range.len())),
            values: Vec::new(),
        })
        .grad
    }
}

/// The slots' target ids `[n]`.
pub fn target_ids(
    slots: &Slots,
    batch: &TokenBatch,
    device: &burn::tensor::Device,
) -> Tensor<1, Int> {
    let ids: Vec<i64> = slots.targets(batch).into_iter().map(i64::from).collect();
    let n = ids.len();
    Tensor::from_data(TensorData::new(ids, [n]), &device.clone().inner())
}

/// `log_softmax(z)[target]` per row: `z` `[1, m, vocab]`, targets `[m]`.
pub fn target_logprobs(z: Tensor<3>, targets: Tensor<1, Int>) -> Tensor<1> {
    let [_, m, _] = z.dims();
    let logp = crate::kernels::log_softmax::log_softmax(z);
    logp.gather(2, targets.reshape([1, m, 1])).reshape([m])
}

/// Entropy of `softmax(z)` per row: `z` `[1, m, vocab]` → `[m]`.
pub fn row_entropy(z: Tensor<3>) -> Tensor<1> {
    let [_, m, _] = z.dims();
    let logp = crate::kernels::log_softmax::log_softmax(z);
    logp.clone().exp().mul(logp).sum_dim(2).reshape([m]).neg()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::{Adaptable, LoraConfig, TARGETS};
    use crate::params::{named_grads, param_map, with_params};
    use crate::{Gemma2Config, RandomInit};
    use burn::tensor::Device;

    fn model(device: &Device, softcap: Option<f64>) -> Gemma2ForCausalLM {
        let mut c = Gemma2Config::new(40, 16, 32, 2, 2, 1, 8, 8);
        c.final_logit_softcapping = softcap;
        Gemma2ForCausalLM::new(&c, &mut RandomInit::new(5), device).unwrap()
    }

    /// A LoRA model with non-zero B, so that every factor has a gradient.
    fn lora(device: &Device, softcap: Option<f64>) -> Gemma2ForCausalLM {
        let cfg = LoraConfig {
            rank: 2,
            alpha: 4.0,
            targets: TARGETS.iter().map(|t| t.to_string()).collect(),
            dropout: 0.0,
        };
        let m = model(device, softcap).attach_lora(&cfg, 1);
        let mut p = param_map(&m);
        for (name, t) in p.iter_mut() {
            if name.contains("lora_b") {
                let n = t.shape.iter().product::<usize>();
                let v: Vec<f32> = (0..n).map(|i| ((i % 5) as f32 - 2.0) * 0.05).collect();
                *t = t.with(Tensor::from_data(TensorData::new(v, [n]), device));
            }
        }
        with_params(m, &p)
    }

    /// Right-padded rows of different lengths, so some slots are dropped.
    fn batch() -> (TokenBatch, Vec<f32>) {
        let rows = [vec![2, 5, 9, 11, 3], vec![2, 7, 30], vec![2, 39, 8, 17, 21]];
        let b = TokenBatch::new(&rows, 0, crate::Padding::Right);
        // targets: the last two of row 0, two of row 1, the last three of row 2
        let w = vec![0., 0., 1., 1., 0., 1., 1., 0., 0., 1., 1., 1.];
        (b, w)
    }

    /// Loss = −Σ w·log p / Σ w and every gradient, whole and chunked.
    fn loss_and_grads(
        chunk: Option<usize>,
        softcap: Option<f64>,
        full: bool,
    ) -> (f64, Vec<(String, Vec<f32>)>) {
        let device = Device::default().autodiff();
        let m = if full {
            model(&device, softcap)
        } else {
            lora(&device, softcap)
        };
        let (batch, w) = batch();
        let hidden = m.model.forward(&batch, None);
        let loss = match chunk {
            None => {
                let logits = m.logits(hidden);
                let logp = crate::gemma2::next_token_logprobs(logits, &batch);
                let wt = Tensor::<2>::from_data(TensorData::new(w.clone(), [3, 4]), &device);
                (logp * wt).sum().neg().div_scalar(w.iter().sum::<f32>())
            }
            Some(chunk) => {
                let slots = Slots::nonzero(&w, &batch);
                let rows = m.slot_hidden(hidden, &slots);
                let targets = target_ids(&slots, &batch, &device);
                let out = m.head_terms(rows, chunk, |z, r| RowTerms {
                    grad: target_logprobs(z, targets.clone().narrow(0, r.start, r.len())),
                    values: Vec::new(),
                });
                out.grad.sum().neg().div_scalar(slots.len() as f32)
            }
        };
        let value = loss.clone().into_scalar::<f64>();
        let grads = named_grads(&m, &loss.backward());
        (value, grads.into_iter().map(|(k, v)| (k, v.data)).collect())
    }

    #[test]
    fn chunked_loss_and_gradients_equal_the_whole_logits_path() {
        // LoRA (frozen head: chunked) and full fine-tuning (the head trains)
        for (full, trained) in [(false, 2 * 2 * 7), (true, 1 + 2 * (4 + 7) + 1)] {
            for softcap in [None, Some(3.0)] {
                chunks_agree(full, trained, softcap);
            }
        }
    }

    fn chunks_agree(full: bool, trained: usize, softcap: Option<f64>) {
        {
            let (want, want_g) = loss_and_grads(None, softcap, full);
            for chunk in [1, 2, 5, 100] {
                let (got, got_g) = loss_and_grads(Some(chunk), softcap, full);
                assert!((got - want).abs() <= 1e-5 * want.abs(), "{got} vs {want}");
                assert_eq!(got_g.len(), want_g.len());
                assert_eq!(got_g.len(), trained, "every trained tensor has a gradient");
                for ((name, g), (_, w)) in got_g.iter().zip(&want_g) {
                    let scale = w.iter().fold(0f32, |a, x| a.max(x.abs()));
                    for (a, b) in g.iter().zip(w) {
                        assert!(
                            (a - b).abs() <= 1e-5 * scale,
                            "{name} chunk {chunk} cap {softcap:?}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn without_autodiff_the_chunks_give_the_values() {
        let device = Device::default();
        let m = model(&device, Some(3.0));
        let (batch, w) = batch();
        let whole = crate::gemma2::next_token_logprobs(m.forward(&batch), &batch)
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        let slots = Slots::nonzero(&w, &batch);
        let hidden = m.model.forward(&batch, None);
        let got = m
            .slot_logprobs(hidden, &slots, &batch)
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        assert_eq!(got.len(), 7);
        for (&q, g) in slots.flat.iter().zip(&got) {
            assert!((g - whole[q]).abs() < 1e-5, "slot {q}: {g} vs {}", whole[q]);
        }
    }
}
