//! Log-probabilities of an example's target tokens (a completion, a sampled
//! answer) under any causal LM: per sequence, per token, with or without
//! gradients.

use burn::tensor::{Device, Int, Tensor, TensorData};
use posttrain_datasets::Example;
use posttrain_model::gemma2::next_token_logprobs;
use posttrain_model::kernels::log_softmax::log_softmax;
use posttrain_model::lm_head::{
    HeadOutput, RowTerms, Slots, row_entropy, target_ids, target_logprobs,
};
use posttrain_model::{Gemma2ForCausalLM, TokenBatch};

use crate::make_batch;

/// A right-padded batch of `examples` and its target weights.
pub fn batch_of(examples: &[Example], pad: u32, device: &Device) -> (TokenBatch, Tensor<2>) {
    let refs: Vec<&Example> = examples.iter().collect();
    make_batch(&refs, pad, device)
}

/// Each example's mean log-prob per target token (its length-normalised
/// log-probability) `[n]`, differentiable, and the batch's tokens.
pub fn mean_logprobs(
    model: &Gemma2ForCausalLM,
    examples: &[Example],
    pad: u32,
) -> (Tensor<1>, u64) {
    let device = model.model.embed_tokens.weight.device();
    let (batch, weights) = batch_of(examples, pad, &device);
    let tokens = batch.valid.iter().filter(|&&v| v).count() as u64;
    let lengths: Vec<f32> = examples
        .iter()
        .map(|e| e.target.iter().skip(1).filter(|&&t| t).count().max(1) as f32)
        .collect();
    let lengths = Tensor::from_data(TensorData::new(lengths, [examples.len()]), &device);
    (
        sequence_logprobs(model, &batch, weights, false).sums / lengths,
        tokens,
    )
}

/// The sampled tokens' log-probabilities under a model: per sequence,
/// per position, and the mean entropy of the next-token distribution.
pub struct SequenceLogprobs {
    /// Per sequence `[n]`, differentiable.
    pub sums: Tensor<1>,
    /// Per position `[n, t − 1]` (0 where no sampled token is predicted).
    pub tokens: Tensor<2>,
    /// Mean entropy over the positions that predict a sampled token, when
    /// asked for (no gradient).
    pub entropy: Option<f64>,
}

/// [`SequenceLogprobs`] of `batch` with target `weights` `[n, t − 1]`; the
/// head runs in chunks over only the weighted positions when it is frozen
/// and large (see `posttrain_model::lm_head`).
pub fn sequence_logprobs(
    model: &Gemma2ForCausalLM,
    batch: &TokenBatch,
    weights: Tensor<2>,
    entropy: bool,
) -> SequenceLogprobs {
    let b = batch.batch;
    let hidden = model.model.forward(batch, None);
    if !model.chunks_head(batch) {
        let logits = model.logits(hidden);
        let tokens = next_token_logprobs(logits.clone(), batch).mul(weights.clone());
        let sums = tokens.clone().sum_dim(1).reshape([b]);
        let entropy = entropy.then(|| mean_entropy(logits, weights));
        return SequenceLogprobs {
            sums,
            tokens,
            entropy,
        };
    }
    let w: Vec<f32> = weights
        .clone()
        .inner()
        .into_data()
        .try_to_vec()
        .expect("f32 weights");
    let slots = Slots::nonzero(&w, batch);
    let w = slots.select(weights.inner().reshape([b * (batch.len - 1)]));
    let rows = model.slot_hidden(hidden, &slots);
    let targets = target_ids(&slots, batch, &rows.device());
    let out = model.head_terms(rows, model.head_chunk(), |z, r| RowTerms {
        grad: target_logprobs(z.clone(), targets.clone().narrow(0, r.start, r.len()))
            * w.clone().narrow(0, r.start, r.len()),
        values: if entropy {
            vec![row_entropy(z)]
        } else {
            Vec::new()
        },
    });
    let tokens = slots.spread(out.grad, b);
    let sums = tokens.clone().sum_dim(1).reshape([b]);
    let entropy = out.values.into_iter().next().map(|h| {
        let n = slots.len().max(1) as f64;
        h.sum().into_scalar::<f64>() / n
    });
    SequenceLogprobs {
        sums,
        tokens,
        entropy,
    }
}

/// Mean entropy of the model's next-token distribution over the positions
/// that predict a sampled token (no gradient).
pub fn mean_entropy(logits: Tensor<3>, weights: Tensor<2>) -> f64 {
    let [b, t, _] = logits.dims();
    let logp = log_softmax(logits.inner().narrow(1, 0, t - 1));
    let h = logp
        .clone()
        .exp()
        .mul(logp)
        .sum_dim(2)
        .reshape([b, t - 1])
        .neg();
    let w = weights.inner();
    let n = w.clone().sum().into_scalar::<f64>().max(1.0);
    h.mul(w).sum().into_scalar::<f64>() / n
}

/// Each example's sampled-token log-probabilities, in order, read from
/// per-position values `[n, t − 1]` of a batch of `examples`.
pub fn per_example(examples: &[Example], values: &[f64], t: usize) -> Vec<Vec<f64>> {
    examples
        .iter()
        .enumerate()
        .map(|(r, e)| {
            (0..e.ids.len() - 1)
                .filter(|&p| e.target[p + 1])
                .map(|p| values[r * (t - 1) + p])
                .collect()
        })
        .collect()
}

/// Per-sequence log-probability sums under `model`, without gradients,
/// `batch_size` sequences per forward.
pub fn logprob_sums(
    model: &Gemma2ForCausalLM,
    examples: &[Example],
    pad: u32,
    batch_size: usize,
) -> Vec<f64> {
    logprob_sums_and_tokens(model, examples, pad, batch_size, false).0
}

/// [`logprob_sums`] and, when `per_token`, each example's sampled-token
/// log-probabilities in order, from the same forward passes.
pub fn logprob_sums_and_tokens(
    model: &Gemma2ForCausalLM,
    examples: &[Example],
    pad: u32,
    batch_size: usize,
    per_token: bool,
) -> (Vec<f64>, Option<Vec<Vec<f64>>>) {
    let device = model.model.embed_tokens.weight.device();
    let mut sums = Vec::with_capacity(examples.len());
    let mut tokens = per_token.then(Vec::new);
    for chunk in examples.chunks(batch_size.max(1)) {
        let (batch, weights) = batch_of(chunk, pad, &device);
        let lp = sequence_logprobs(model, &batch, weights, false);
        let lp_sums = lp.sums.into_data().try_into_vec_as::<f64>();
        sums.extend(lp_sums.expect("float sums"));
        if let Some(tokens) = tokens.as_mut() {
            let values = lp.tokens.into_data().try_into_vec_as::<f64>();
            tokens.extend(per_example(chunk, &values.expect("float"), batch.len));
        }
    }
    (sums, tokens)
}

/// [`logprob_sums_and_tokens`] of examples of which several share a prompt
/// (the K samples of each prompt in an RLHF step). In each forward's
/// `batch_size` examples every distinct prompt (the tokens before the first
/// target) runs once, left-padded so that all prompts end in the same
/// column; its samples' completions then continue from copies of its keys
/// and values. The same values as the separate passes up to rounding, for
/// `(K − 1)·prompt` fewer tokens through the model per prompt.
pub fn shared_prompt_logprobs(
    model: &Gemma2ForCausalLM,
    examples: &[Example],
    pad: u32,
    batch_size: usize,
    per_token: bool,
) -> (Vec<f64>, Option<Vec<Vec<f64>>>) {
    let mut sums = Vec::with_capacity(examples.len());
    let mut tokens = per_token.then(Vec::new);
    for chunk in examples.chunks(batch_size.max(1)) {
        let values = shared_prompt_chunk(model, chunk, pad);
        sums.extend(values.iter().map(|v| v.iter().sum::<f64>()));
        if let Some(tokens) = tokens.as_mut() {
            tokens.extend(values);
        }
    }
    (sums, tokens)
}

/// Each example's target log-probs, in order, with shared prompts.
fn shared_prompt_chunk(model: &Gemma2ForCausalLM, chunk: &[Example], pad: u32) -> Vec<Vec<f64>> {
    let Some(shared) = SharedRows::of(model, chunk, pad) else {
        // nothing to share: no prompt, or nothing to score after it
        let (_, tokens) = logprob_sums_and_tokens(model, chunk, pad, chunk.len(), true);
        return tokens.expect("asked for");
    };
    let values = shared.head(model, false).grad.into_data();
    let mut values = values
        .try_into_vec_as::<f64>()
        .expect("float log-probs")
        .into_iter();
    shared
        .counts
        .into_iter()
        .map(|c| values.by_ref().take(c).collect())
        .collect()
}

/// [`sequence_logprobs`] of `examples`, which `batch` and `weights` lay out
/// (as [`batch_of`] makes them), with each distinct prompt run once: the
/// same values and gradients up to rounding (see
/// [`shared_prompt_logprobs`]).
pub fn shared_sequence_logprobs(
    model: &Gemma2ForCausalLM,
    examples: &[Example],
    pad: u32,
    (batch, weights): (&TokenBatch, Tensor<2>),
    entropy: bool,
) -> SequenceLogprobs {
    let Some(shared) = SharedRows::of(model, examples, pad) else {
        return sequence_logprobs(model, batch, weights, entropy);
    };
    let w = weights.inner().into_data().try_into_vec::<f32>();
    let slots = Slots::nonzero(&w.expect("f32 weights"), batch);
    assert_eq!(slots.len(), shared.counts.iter().sum::<usize>());
    let out = shared.head(model, entropy);
    let tokens = slots.spread(out.grad, batch.batch);
    let sums = tokens.clone().sum_dim(1).reshape([batch.batch]);
    let entropy = out.values.into_iter().next().map(|h| {
        let n = slots.len().max(1) as f64;
        h.sum().into_scalar::<f64>() / n
    });
    SequenceLogprobs {
        sums,
        tokens,
        entropy,
    }
}

/// The hidden rows that predict every target of a set of examples, from a
/// pass that runs each distinct prompt once.
struct SharedRows {
    /// `[targets, hidden]`, examples in order, each one's targets in order.
    rows: Tensor<2>,
    targets: Tensor<1, Int>,
    /// Targets per example.
    counts: Vec<usize>,
}

impl SharedRows {
    /// `None` when an example has no prompt or no target after it.
    fn of(model: &Gemma2ForCausalLM, examples: &[Example], pad: u32) -> Option<Self> {
        let split: Vec<usize> = examples
            .iter()
            .map(|e| e.target.iter().position(|&t| t).unwrap_or(e.ids.len()))
            .collect();
        if examples
            .iter()
            .zip(&split)
            .any(|(e, &p)| p == 0 || p == e.ids.len())
        {
            return None;
        }
        let mut prompts: Vec<Vec<u32>> = Vec::new();
        let mut of = Vec::with_capacity(examples.len());
        for (e, &p) in examples.iter().zip(&split) {
            let prompt = &e.ids[..p];
            of.push(match prompts.iter().position(|q| q == prompt) {
                Some(u) => u,
                None => {
                    prompts.push(prompt.to_vec());
                    prompts.len() - 1
                }
            });
        }
        let completions: Vec<Vec<u32>> = examples
            .iter()
            .zip(&split)
            .map(|(e, &p)| e.ids[p..].to_vec())
            .collect();
        let (last, hidden, _) = model.model.forward_shared(&prompts, &of, &completions, pad);
        let [u, h] = last.dims();
        let [n, lc, _] = hidden.dims();
        // the prompts' last rows, then every completion row
        let hidden = Tensor::cat(vec![last, hidden.reshape([n * lc, h])], 0);
        let (mut rows, mut targets, mut counts) = (Vec::new(), Vec::new(), Vec::new());
        for (i, (e, &p)) in examples.iter().zip(&split).enumerate() {
            let before = rows.len();
            for j in (p..e.ids.len()).filter(|&j| e.target[j]) {
                rows.push(if j == p {
                    of[i]
                } else {
                    u + i * lc + j - 1 - p
                } as i64);
                targets.push(i64::from(e.ids[j]));
            }
            counts.push(rows.len() - before);
        }
        let m = rows.len();
        let device = hidden.device().inner();
        let index = |v: Vec<i64>| Tensor::<1, Int>::from_data(TensorData::new(v, [m]), &device);
        Some(Self {
            rows: hidden.select(0, index(rows)),
            targets: index(targets),
            counts,
        })
    }

    /// The targets' log-probs (and the entropy of each row, when asked)
    /// through the chunked head.
    fn head(&self, model: &Gemma2ForCausalLM, entropy: bool) -> HeadOutput {
        model.head_terms(self.rows.clone(), model.head_chunk(), |z, r| RowTerms {
            grad: target_logprobs(z.clone(), self.targets.clone().narrow(0, r.start, r.len())),
            values: if entropy {
                vec![row_entropy(z)]
            } else {
                Vec::new()
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;
    use posttrain_model::lora::{Adaptable, TARGETS};
    use posttrain_model::params::{named_grads, param_map, with_params};
    use posttrain_model::{Gemma2Config, LoraConfig, RandomInit};

    fn policy(device: &Device, chunk_rows: Option<usize>) -> Gemma2ForCausalLM {
        let mut c = Gemma2Config::new(30, 16, 32, 2, 2, 1, 8, 4);
        c.final_logit_softcapping = Some(4.0);
        let cfg = LoraConfig {
            rank: 2,
            alpha: 2.0,
            targets: TARGETS.iter().map(|t| t.to_string()).collect(),
            dropout: 0.0,
        };
        let m = Gemma2ForCausalLM::new(&c, &mut RandomInit::new(4), device)
            .unwrap()
            .attach_lora(&cfg, 2);
        let mut p = param_map(&m);
        for (name, t) in p.iter_mut() {
            if name.contains("lora_b") {
                let n = t.shape.iter().product::<usize>();
                let v: Vec<f32> = (0..n).map(|i| ((i % 3) as f32 - 1.0) * 0.05).collect();
                *t = t.with(Tensor::from_data(TensorData::new(v, [n]), device));
            }
        }
        let mut m = with_params(m, &p);
        if let Some(rows) = chunk_rows {
            m.head_chunk_elements = rows * 30;
        }
        m
    }

    /// `n` completions of 4, 5, … tokens after a 2-token prompt.
    fn examples(n: u32) -> Vec<Example> {
        (0..n)
            .map(|i| {
                let ids: Vec<u32> = (0..4 + i as usize)
                    .map(|j| 5 + (i * 3 + j as u32 * 7) % 25)
                    .collect();
                let target = (0..ids.len()).map(|j| j >= 2).collect();
                Example {
                    ids,
                    target,
                    topk: None,
                }
            })
            .collect()
    }

    /// Sums, tokens and entropy of sampled completions, and the gradient of
    /// a DPO-like nonlinear function of the sums.
    fn run(chunk_rows: Option<usize>) -> (Vec<f32>, Vec<f32>, f64, Vec<Vec<f32>>) {
        let device = Device::default().autodiff();
        let m = policy(&device, chunk_rows);
        let examples = examples(4);
        let (batch, weights) = batch_of(&examples, 0, &device);
        assert_eq!(m.chunks_head(&batch), chunk_rows.is_some());
        terms(&m, sequence_logprobs(&m, &batch, weights, true), false)
    }

    /// Sums, per-token values, entropy and every factor's gradient of a
    /// sigmoid of the sums (plus the tokens' exp, when `tokens_in_loss`).
    type Terms = (Vec<f32>, Vec<f32>, f64, Vec<Vec<f32>>);

    fn terms(m: &Gemma2ForCausalLM, out: SequenceLogprobs, tokens_in_loss: bool) -> Terms {
        let mut loss = burn::tensor::activation::sigmoid(out.sums.clone().mul_scalar(0.3))
            .log()
            .sum();
        if tokens_in_loss {
            loss = loss.add(out.tokens.clone().exp().sum());
        }
        let grads = named_grads(m, &loss.backward());
        let host = |t: Tensor<2>| t.inner().into_data().try_into_vec::<f32>().unwrap();
        (
            out.sums.inner().into_data().try_into_vec::<f32>().unwrap(),
            host(out.tokens),
            out.entropy.unwrap(),
            grads.into_values().map(|g| g.data).collect(),
        )
    }

    /// Values within 1e-5 relative, every one of the 28 gradients within
    /// 1e-5 of its largest entry.
    fn assert_terms_close((s, t, e, g): &Terms, (sums, tokens, entropy, grads): &Terms) {
        let close = |a: &[f32], b: &[f32]| {
            a.len() == b.len()
                && a.iter()
                    .zip(b)
                    .all(|(x, y)| (x - y).abs() <= 1e-5 * (1.0 + y.abs()))
        };
        assert!(close(s, sums), "{s:?} vs {sums:?}");
        assert!(close(t, tokens), "{t:?} vs {tokens:?}");
        assert!((e - entropy).abs() < 1e-5, "{e} vs {entropy}");
        assert_eq!(g.len(), 28);
        for (a, b) in g.iter().zip(grads) {
            let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(scale > 0.0);
            assert!(
                a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-5 * scale),
                "{a:?} vs {b:?}"
            );
        }
    }

    #[test]
    fn chunked_sequence_logprobs_equal_the_whole_logits() {
        let whole = run(None);
        for rows in [1, 4] {
            assert_terms_close(&run(Some(rows)), &whole);
        }
    }

    /// Samples of three prompts (2, 3 and 6 tokens; 3, 1 and 2 samples),
    /// interleaved, completions of 1–13 tokens.
    fn sampled() -> Vec<Example> {
        let prompts: [&[u32]; 3] = [&[3, 9], &[7, 7, 12], &[4, 20, 5, 11, 2, 17]];
        let samples = [(0, 5), (1, 1), (0, 13), (2, 4), (0, 2), (2, 9)];
        samples
            .iter()
            .enumerate()
            .map(|(i, &(p, n))| {
                let prompt = prompts[p];
                let mut ids = prompt.to_vec();
                ids.extend((0..n).map(|j| 1 + (i as u32 * 5 + j * 11) % 29));
                let target = (0..ids.len()).map(|j| j >= prompt.len()).collect();
                Example {
                    ids,
                    target,
                    topk: None,
                }
            })
            .collect()
    }

    /// Sums, tokens, entropy and the gradient of a nonlinear function of
    /// sums and tokens, from whole rows or with shared prompts.
    fn shared_or_not(shared: bool, chunk_rows: Option<usize>) -> Terms {
        let device = Device::default().autodiff();
        let m = policy(&device, chunk_rows);
        let examples = sampled();
        let (batch, weights) = batch_of(&examples, 0, &device);
        let out = if shared {
            shared_sequence_logprobs(&m, &examples, 0, (&batch, weights), true)
        } else {
            sequence_logprobs(&m, &batch, weights, true)
        };
        terms(&m, out, true)
    }

    #[test]
    fn shared_prompts_give_the_whole_rows_values_and_gradients() {
        for chunk_rows in [None, Some(3)] {
            let whole = shared_or_not(false, chunk_rows);
            assert_terms_close(&shared_or_not(true, chunk_rows), &whole);
        }
    }

    /// Three prompts of 2, 3 and 6 tokens with 3, 1 and 2 samples each,
    /// interleaved, completions of 1–13 tokens (past the sliding window of
    /// 4), with and without the chunked head: the shared prompt gives the
    /// separate passes' values.
    #[test]
    fn shared_prompts_give_the_separate_passes_values() {
        let device = Device::default();
        let examples = sampled();
        for chunk_rows in [None, Some(3)] {
            let m = policy(&device, chunk_rows);
            for batch_size in [6, 4, 1] {
                let (sums, tokens) = logprob_sums_and_tokens(&m, &examples, 0, batch_size, true);
                let (s, t) = shared_prompt_logprobs(&m, &examples, 0, batch_size, true);
                let (tokens, t) = (tokens.unwrap(), t.unwrap());
                for (e, (a, b)) in examples.iter().zip(tokens.iter().zip(&t)) {
                    assert_eq!(b.len(), e.targets());
                    assert!(
                        a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5),
                        "{a:?} vs {b:?}"
                    );
                }
                assert!(
                    sums.iter().zip(&s).all(|(x, y)| (x - y).abs() < 1e-5),
                    "{sums:?} vs {s:?}"
                );
                let (alone, none) = shared_prompt_logprobs(&m, &examples, 0, batch_size, false);
                assert_eq!((alone, none), (s, None));
            }
        }
    }

    /// One pass gives the sums that the pass without per-token values
    /// gives, and each sum is its tokens' sum.
    #[test]
    fn sums_and_tokens_of_one_pass_equal_the_passes_apart() {
        let device = Device::default();
        let m = policy(&device, None);
        let examples = examples(5);
        let (sums, tokens) = logprob_sums_and_tokens(&m, &examples, 0, 2, true);
        let tokens = tokens.expect("asked for");
        assert_eq!(sums, logprob_sums(&m, &examples, 0, 2));
        for ((s, t), e) in sums.iter().zip(&tokens).zip(&examples) {
            assert_eq!(t.len(), e.target.iter().skip(1).filter(|&&x| x).count());
            assert!((s - t.iter().sum::<f64>()).abs() < 1e-5, "{s} vs {t:?}");
        }
    }
}
