//! What RLHF does with rollouts: their rewards (from a reward model through
//! the `score` command's code path, or from a scorer), and per-sequence
//! log-probabilities of the sampled tokens under any causal LM.

use std::path::Path;

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Tensor};
use posttrain_datasets::{ChatTokenizer, DataError, Example};
use posttrain_model::gemma2::next_token_logprobs;
use posttrain_model::{Gemma2ForCausalLM, Gemma2ForSequenceClassification, Padding, TokenBatch};
use posttrain_reward::{encode_pairs, score_examples};
use posttrain_train::make_batch;
use posttrain_train::rollout::{PromptSet, Rollouts};

/// Where rewards come from.
pub enum Reward<'a> {
    Model(Judge<'a>),
    /// The prompt set's scorer (a verifiable reward, e.g. the embedded
    /// task's ground truth).
    Scorer,
}

impl Reward<'_> {
    pub fn rewards(&self, set: &PromptSet, r: &Rollouts) -> Result<Vec<f64>, DataError> {
        match self {
            Reward::Model(judge) => judge.rewards(set, r),
            Reward::Scorer => r
                .true_scores(set)
                .map(|s| s.into_iter().map(|(score, _)| score).collect())
                .ok_or_else(|| DataError::File {
                    path: "rollouts".into(),
                    reason: "the scorer cannot score a prompt".into(),
                }),
        }
    }
}

/// A reward model and the tokenizer it reads prompts and completions with.
pub struct Judge<'a> {
    pub model: &'a Gemma2ForSequenceClassification,
    pub tokenizer: &'a ChatTokenizer,
    pub max_len: usize,
    pub batch_size: usize,
}

impl Judge<'_> {
    /// The reward of every rollout, chat-rendered as prompt + completion +
    /// `<end_of_turn>` and read at that last token.
    pub fn rewards(&self, set: &PromptSet, r: &Rollouts) -> Result<Vec<f64>, DataError> {
        let rows = r
            .prompt
            .iter()
            .zip(&r.answers)
            .map(|(&p, a)| (set.messages[p].clone(), a.as_str()));
        let seqs = encode_pairs(self.tokenizer, rows, self.max_len, Path::new("rollouts"))?;
        let scores = score_examples(
            self.model,
            &seqs,
            self.tokenizer.pad,
            Padding::Right,
            self.batch_size,
        );
        Ok(scores.into_iter().map(f64::from).collect())
    }
}

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

/// Mean entropy of the model's next-token distribution over the positions
/// that predict a sampled token (no gradient).
pub fn mean_entropy(logits: Tensor<3>, weights: Tensor<2>) -> f64 {
    let [b, t, _] = logits.dims();
    let logp = log_softmax(logits.inner().narrow(1, 0, t - 1), 2);
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
