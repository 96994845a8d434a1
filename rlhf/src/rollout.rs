//! Rollouts: K samples per prompt from the policy (KV-cached), their
//! rewards from the reward model (the `score` command's code path), their
//! true score on the embedded task, and per-sequence log-probabilities of
//! the sampled tokens under any causal LM.

use std::path::Path;

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Tensor};
use posttrain_datasets::task::{expected, score};
use posttrain_datasets::{ChatTokenizer, DataError, Example, Message, Prompt};
use posttrain_model::gemma2::next_token_logprobs;
use posttrain_model::{
    FinishReason, Gemma2ForCausalLM, Gemma2ForSequenceClassification, Padding, SamplingConfig,
    TokenBatch, generate,
};
use posttrain_reward::{encode_pairs, score_examples};
use posttrain_train::make_batch;

/// Prompts rendered for the policy, with what the reward model and the task
/// scorer read.
#[derive(Debug, Clone)]
pub struct PromptSet {
    pub ids: Vec<Vec<u32>>,
    pub messages: Vec<Vec<Message>>,
    /// The text the task scorer reads (last user message).
    pub text: Vec<String>,
}

impl PromptSet {
    /// Renders `prompts` (read from `path`), refusing any that leave no room
    /// for a completion in `max_len` tokens.
    pub fn new(
        prompts: &[Prompt],
        tokenizer: &ChatTokenizer,
        max_len: usize,
        path: &Path,
    ) -> Result<Self, DataError> {
        let mut set = Self {
            ids: Vec::with_capacity(prompts.len()),
            messages: Vec::with_capacity(prompts.len()),
            text: Vec::with_capacity(prompts.len()),
        };
        for (i, p) in prompts.iter().enumerate() {
            let err = |reason: String| DataError::Row {
                path: path.to_path_buf(),
                row: i + 1,
                reason,
            };
            let messages = p.messages();
            let ids = tokenizer
                .render_prompt(&messages)
                .map_err(|e| err(e.to_string()))?;
            if ids.len() >= max_len {
                return Err(err(format!(
                    "prompt of {} tokens leaves no room for a completion in the context of {max_len}",
                    ids.len()
                )));
            }
            set.ids.push(ids);
            set.messages.push(messages);
            set.text.push(p.display().to_string());
        }
        Ok(set)
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// The first prompt (0-based) the embedded task's scorer cannot score.
    pub fn first_non_task(&self) -> Option<usize> {
        self.text.iter().position(|t| expected(t).is_none())
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Sampled completions; sample `i` answers prompt `prompt[i]`.
#[derive(Debug, Clone, Default)]
pub struct Rollouts {
    pub prompt: Vec<usize>,
    /// Prompt + sampled tokens; the sampled tokens are the targets.
    pub examples: Vec<Example>,
    /// Decoded completions without the stop token.
    pub answers: Vec<String>,
    pub finish: Vec<FinishReason>,
}

impl Rollouts {
    pub fn len(&self) -> usize {
        self.prompt.len()
    }

    pub fn is_empty(&self) -> bool {
        self.prompt.is_empty()
    }

    /// Sampled tokens of each completion (with the stop token).
    pub fn lengths(&self) -> Vec<usize> {
        self.examples.iter().map(Example::targets).collect()
    }

    /// Ground-truth scores of the embedded task, or `None` when a prompt is
    /// not one of its questions.
    pub fn true_scores(&self, set: &PromptSet) -> Option<Vec<(f64, bool)>> {
        self.prompt
            .iter()
            .zip(&self.answers)
            .map(|(&p, a)| score(&set.text[p], a).map(|s| (s.score, s.correct)))
            .collect()
    }
}

/// `k` samples of each prompt in `indices` (consecutive per prompt). The
/// sampling budget is cut so that every sequence fits `max_len`.
pub fn roll_out(
    model: &Gemma2ForCausalLM,
    set: &PromptSet,
    indices: &[usize],
    k: usize,
    sampling: &SamplingConfig,
    tokenizer: &ChatTokenizer,
    max_len: usize,
) -> Rollouts {
    let prompt: Vec<usize> = indices
        .iter()
        .flat_map(|&i| std::iter::repeat_n(i, k))
        .collect();
    let ids: Vec<Vec<u32>> = prompt.iter().map(|&i| set.ids[i].clone()).collect();
    let longest = ids.iter().map(Vec::len).max().unwrap_or(0);
    let sampling = SamplingConfig {
        max_new_tokens: sampling.max_new_tokens.min(max_len - longest),
        ..sampling.clone()
    };
    let completions = generate(model, &ids, tokenizer.pad, &sampling, 0);
    let mut out = Rollouts {
        prompt,
        ..Rollouts::default()
    };
    for (mut ids, c) in ids.into_iter().zip(completions) {
        let prompt_len = ids.len();
        ids.extend(&c.tokens);
        let target = (0..ids.len()).map(|i| i >= prompt_len).collect();
        out.answers.push(
            tokenizer
                .decode(c.answer())
                .unwrap_or_default()
                .trim()
                .to_string(),
        );
        out.finish.push(c.finish);
        out.examples.push(Example {
            ids,
            target,
            topk: None,
        });
    }
    out
}

/// Where rewards come from.
pub enum Reward<'a> {
    Model(Judge<'a>),
    /// The embedded task's ground-truth scorer (a verifiable reward).
    Task,
}

impl Reward<'_> {
    pub fn rewards(&self, set: &PromptSet, r: &Rollouts) -> Result<Vec<f64>, DataError> {
        match self {
            Reward::Model(judge) => judge.rewards(set, r),
            Reward::Task => r
                .true_scores(set)
                .map(|s| s.into_iter().map(|(score, _)| score).collect())
                .ok_or_else(|| DataError::File {
                    path: "rollouts".into(),
                    reason: "a prompt is not a question of the embedded task".into(),
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

/// Sum of the sampled tokens' log-probabilities per sequence `[n]`, and the
/// logits they came from.
pub fn sequence_logprobs(
    model: &Gemma2ForCausalLM,
    batch: &TokenBatch,
    weights: Tensor<2>,
) -> (Tensor<1>, Tensor<3>) {
    let logits = model.forward(batch);
    let b = batch.batch;
    let sums = next_token_logprobs(logits.clone(), batch)
        .mul(weights)
        .sum_dim(1)
        .reshape([b]);
    (sums, logits)
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
        let (s, _) = sequence_logprobs(model, &batch, weights);
        out.extend(s.into_data().try_into_vec_as::<f64>().expect("float sums"));
    }
    out
}
