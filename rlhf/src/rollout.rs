//! What RLHF does with rollouts: their rewards (from a reward model through
//! the `score` command's code path, or from a scorer) and the entropy of the
//! policy over them.

use std::path::Path;

use posttrain_datasets::{ChatTokenizer, DataError};
use posttrain_model::Gemma2ForSequenceClassification;
use posttrain_reward::{encode_pairs, score_with_shared_prompts};
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
        let scores = score_with_shared_prompts(
            self.model,
            &seqs,
            &r.prompt,
            self.tokenizer.pad,
            self.batch_size,
        );
        Ok(scores.into_iter().map(f64::from).collect())
    }
}
