//! Rollouts: sampled completions of rendered prompts as training examples
//! (the sampled tokens are the targets), for RLHF, policy evaluation and
//! on-policy distillation; and the scorer that judges answers when the task
//! has one (the embedded task's ground truth), passed in by the caller.

use std::path::Path;

use posttrain_datasets::{ChatTokenizer, DataError, Example, Message, Prompt};
use posttrain_model::{FinishReason, Gemma2ForCausalLM, SamplingConfig, generate};

use crate::Vocab;

/// Scores an answer to a prompt: `(score in [0, 1], correct)`, or `None`
/// when the prompt is not one the scorer knows.
pub type Scorer = fn(prompt: &str, answer: &str) -> Option<(f64, bool)>;

/// Prompts rendered for the policy, with what the reward model and the task
/// scorer read.
#[derive(Debug, Clone)]
pub struct PromptSet {
    pub ids: Vec<Vec<u32>>,
    pub messages: Vec<Vec<Message>>,
    /// The text a scorer reads (last user message).
    pub text: Vec<String>,
    /// What scores an answer to these prompts, when something can.
    pub scorer: Option<Scorer>,
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
            scorer: None,
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

    /// Answers to these prompts are scored by `scorer`.
    pub fn with_scorer(mut self, scorer: Scorer) -> Self {
        self.scorer = Some(scorer);
        self
    }

    /// The first prompt (0-based) the scorer cannot score (every one without a scorer).
    pub fn first_unscored(&self) -> Option<usize> {
        let scorer = self.scorer?;
        self.text.iter().position(|t| scorer(t, "").is_none())
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

    /// The set's scorer's score and correctness of every answer, or `None`
    /// without a scorer or when it cannot score a prompt.
    pub fn true_scores(&self, set: &PromptSet) -> Option<Vec<(f64, bool)>> {
        let scorer = set.scorer?;
        self.prompt
            .iter()
            .zip(&self.answers)
            .map(|(&p, a)| scorer(&set.text[p], a))
            .collect()
    }
}

/// Every rank's `(score, correct)` pairs in rank order, on every rank of a
/// data-parallel run (`None` when any rank has none).
pub fn gather_true_scores(local: Option<Vec<(f64, bool)>>) -> Option<Vec<(f64, bool)>> {
    let world = posttrain_dist::world();
    let mut unscored = [f64::from(u8::from(local.is_none()))];
    world.sum_f64(&mut unscored);
    let local = local.filter(|_| unscored[0] == 0.0)?;
    let score = world.all_gather_f64(&local.iter().map(|x| x.0).collect::<Vec<_>>());
    let right: Vec<f64> = local.iter().map(|x| f64::from(u8::from(x.1))).collect();
    let right = world.all_gather_f64(&right);
    Some(
        score
            .into_iter()
            .zip(right.iter().map(|&r| r > 0.0))
            .collect(),
    )
}

/// `k` samples of each prompt in `indices` (consecutive per prompt). The
/// sampling budget is cut so that every sequence fits the context.
pub fn roll_out(
    model: &Gemma2ForCausalLM,
    set: &PromptSet,
    indices: &[usize],
    k: usize,
    sampling: &SamplingConfig,
    vocab: &Vocab,
) -> Rollouts {
    roll_out_share(model, set, indices, 0..indices.len(), k, sampling, vocab)
}

/// The samples of [`roll_out`] for the prompts `share` of `indices` alone
/// (one rank's share of a step): the same budget and random streams as the
/// whole roll-out gives them.
pub fn roll_out_share(
    model: &Gemma2ForCausalLM,
    set: &PromptSet,
    indices: &[usize],
    share: std::ops::Range<usize>,
    k: usize,
    sampling: &SamplingConfig,
    vocab: &Vocab,
) -> Rollouts {
    let longest = indices.iter().map(|&i| set.ids[i].len()).max().unwrap_or(0);
    let prompt: Vec<usize> = indices[share.clone()]
        .iter()
        .flat_map(|&i| std::iter::repeat_n(i, k))
        .collect();
    let ids: Vec<Vec<u32>> = prompt.iter().map(|&i| set.ids[i].clone()).collect();
    let rows = Rows {
        first: (share.start * k) as u64,
        longest,
    };
    Rollouts {
        prompt,
        ..complete_rows(model, ids, sampling, vocab, false, rows)
    }
}

/// Where a roll-out's rows sit in a larger one: the first row's number
/// (its random stream) and the larger one's longest prompt (its budget).
struct Rows {
    first: u64,
    longest: usize,
}

/// One sampled completion of each prompt, as examples whose targets are the
/// sampled tokens (the sampling budget cut to fit the context). With
/// `close_cut`, a completion cut by the budget gets a closing
/// `<end_of_turn>` target when there is room, so that stopping is learnt too.
/// Row `r` draws from random stream `first + r`.
pub fn complete(
    model: &Gemma2ForCausalLM,
    prompts: Vec<Vec<u32>>,
    sampling: &SamplingConfig,
    vocab: &Vocab,
    close_cut: bool,
    first: u64,
) -> Rollouts {
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let rows = Rows { first, longest };
    complete_rows(model, prompts, sampling, vocab, close_cut, rows)
}

fn complete_rows(
    model: &Gemma2ForCausalLM,
    prompts: Vec<Vec<u32>>,
    sampling: &SamplingConfig,
    vocab: &Vocab,
    close_cut: bool,
    rows: Rows,
) -> Rollouts {
    let tokenizer = vocab.tokenizer;
    let sampling = SamplingConfig {
        max_new_tokens: sampling.max_new_tokens.min(vocab.max_len - rows.longest),
        ..sampling.clone()
    };
    let completions = generate(model, &prompts, tokenizer.pad, &sampling, rows.first);
    let mut out = Rollouts {
        prompt: (0..prompts.len()).collect(),
        ..Rollouts::default()
    };
    for (mut ids, c) in prompts.into_iter().zip(completions) {
        let prompt_len = ids.len();
        ids.extend(&c.tokens);
        if close_cut && c.finish == FinishReason::Length && ids.len() < vocab.max_len {
            ids.push(tokenizer.end_of_turn);
        }
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
