//! Log-probabilities of an example's target tokens (a completion, a sampled
//! answer) under any causal LM: per sequence, per token, with or without
//! gradients.

use burn::tensor::{Device, Tensor};
use posttrain_datasets::Example;
use posttrain_model::gemma2::next_token_logprobs;
use posttrain_model::{Gemma2ForCausalLM, TokenBatch};

use crate::make_batch;

/// A right-padded batch of `examples` and its target weights.
pub fn batch_of(examples: &[Example], pad: u32, device: &Device) -> (TokenBatch, Tensor<2>) {
    let refs: Vec<&Example> = examples.iter().collect();
    make_batch(&refs, pad, device)
}

/// Sum of the sampled tokens' log-probabilities per sequence `[n]`, the
/// logits they came from, and the log-probabilities per position `[n, t − 1]`
/// (0 where no sampled token is predicted).
pub fn sequence_logprobs(
    model: &Gemma2ForCausalLM,
    batch: &TokenBatch,
    weights: Tensor<2>,
) -> (Tensor<1>, Tensor<3>, Tensor<2>) {
    let logits = model.forward(batch);
    let b = batch.batch;
    let tokens = next_token_logprobs(logits.clone(), batch).mul(weights);
    let sums = tokens.clone().sum_dim(1).reshape([b]);
    (sums, logits, tokens)
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

/// Per-token log-probabilities of the sampled tokens under `model`, without
/// gradients, `batch_size` sequences per forward.
pub fn token_logprobs(
    model: &Gemma2ForCausalLM,
    examples: &[Example],
    pad: u32,
    batch_size: usize,
) -> Vec<Vec<f64>> {
    let device = model.model.embed_tokens.weight.device();
    let mut out = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(batch_size.max(1)) {
        let (batch, weights) = batch_of(chunk, pad, &device);
        let (_, _, tokens) = sequence_logprobs(model, &batch, weights);
        let values = tokens.into_data().try_into_vec_as::<f64>().expect("float");
        out.extend(per_example(chunk, &values, batch.len));
    }
    out
}

/// Per-sequence log-probability sums under `model`, without gradients,
/// `batch_size` sequences per forward.
pub fn logprob_sums(
    model: &Gemma2ForCausalLM,
    examples: &[Example],
    pad: u32,
    batch_size: usize,
) -> Vec<f64> {
    let device = model.model.embed_tokens.weight.device();
    let mut out = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(batch_size.max(1)) {
        let (batch, weights) = batch_of(chunk, pad, &device);
        let (s, _, _) = sequence_logprobs(model, &batch, weights);
        out.extend(s.into_data().try_into_vec_as::<f64>().expect("float sums"));
    }
    out
}
