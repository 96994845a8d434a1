//! From records to token sequences with loss masks, and from sequences to
//! batches (length-bucketed, seeded order).

use std::path::Path;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::records::{DataError, TopK, TrainRecord};
use crate::tokenizer::{ChatTokenizer, Message, Role};

/// A token sequence and, per token, whether it is a training target; with
/// stored teacher top-k, one row per target token in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub target: Vec<bool>,
    pub topk: Option<TopK>,
}

impl Example {
    /// Tokens before the first target (the rendered prompt of a pair).
    pub fn prompt_len(&self) -> usize {
        self.target
            .iter()
            .position(|&t| t)
            .unwrap_or(self.ids.len())
    }

    pub fn targets(&self) -> usize {
        self.target.iter().filter(|&&t| t).count()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// A sequence longer than the context is an error naming its row.
    Error,
    /// Cut it at the context length.
    Truncate,
}

/// Which tokens of a pair are trained on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossOn {
    /// The completion and the `<end_of_turn>` closing it.
    Completion,
    /// Every token after the first.
    All,
}

impl ChatTokenizer {
    /// Prompt turns plus the completion as the model's turn; `target` marks
    /// the completion and its closing `<end_of_turn>`.
    pub fn render_example(
        &self,
        messages: &[Message],
        completion: &str,
    ) -> Result<Example, crate::TokenizerError> {
        let (ids, prompt_len) = self.render_reply(messages, completion)?;
        let target = (0..ids.len()).map(|i| i >= prompt_len).collect();
        Ok(Example {
            ids,
            target,
            topk: None,
        })
    }
}

/// Tokenizes training rows; `path` names the source in errors (rows
/// 1-based). Text rows become `<bos> text <eos>` with every token a target;
/// pairs follow the chat template and `loss_on`.
pub fn encode_records(
    tokenizer: &ChatTokenizer,
    records: &[TrainRecord],
    max_len: usize,
    overflow: Overflow,
    loss_on: LossOn,
    path: &Path,
) -> Result<Vec<Example>, DataError> {
    records
        .iter()
        .enumerate()
        .map(|(i, record)| {
            let err = |reason: String| DataError::Row {
                path: path.to_path_buf(),
                row: i + 1,
                reason,
            };
            let mut ex = match record {
                TrainRecord::Pair(pair) => tokenizer
                    .render_example(&pair.prompt.messages(), &pair.completion)
                    .map_err(|e| err(e.to_string()))?,
                TrainRecord::Text(text) => {
                    let mut ids = vec![tokenizer.bos];
                    ids.extend(tokenizer.encode(text).map_err(|e| err(e.to_string()))?);
                    ids.push(tokenizer.eos);
                    let target = vec![true; ids.len()];
                    Example {
                        ids,
                        target,
                        topk: None,
                    }
                }
            };
            if loss_on == LossOn::All || matches!(record, TrainRecord::Text(_)) {
                ex.target = (0..ex.ids.len()).map(|i| i > 0).collect();
            }
            if let TrainRecord::Pair(pair) = record
                && let Some(topk) = &pair.teacher_topk
            {
                if loss_on == LossOn::All {
                    return Err(err(
                        "teacher top-k rows cover the completion only: train them with the loss on the completion".into(),
                    ));
                }
                if topk.ids.len() != ex.targets() {
                    return Err(err(format!(
                        "{} teacher top-k rows for {} completion tokens (the completion plus <end_of_turn>): was it generated with this tokenizer?",
                        topk.ids.len(),
                        ex.targets()
                    )));
                }
                ex.topk = Some(topk.clone());
            }
            if ex.ids.len() > max_len {
                match overflow {
                    Overflow::Error => {
                        return Err(err(format!(
                            "{} tokens exceed the context of {max_len} (pass --truncate to cut)",
                            ex.ids.len()
                        )));
                    }
                    Overflow::Truncate => {
                        ex.ids.truncate(max_len);
                        ex.target.truncate(max_len);
                        let targets = ex.targets();
                        if let Some(topk) = &mut ex.topk {
                            topk.ids.truncate(targets);
                            topk.logprobs.truncate(targets);
                        }
                        if !ex.target.iter().any(|&t| t) {
                            return Err(err(format!(
                                "the prompt alone fills the context of {max_len}: nothing left to train on"
                            )));
                        }
                    }
                }
            }
            Ok(ex)
        })
        .collect()
}

/// Example indices in batches: shuffled by `seed`, sorted by length within
/// windows of 16 batches so that a batch holds similar lengths (little
/// padding), then the batch order shuffled again.
pub fn bucketed_batches(lengths: &[usize], batch_size: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.shuffle(&mut rng);
    let window = batch_size * 16;
    let mut batches = Vec::new();
    for chunk in order.chunks_mut(window) {
        chunk.sort_by_key(|&i| lengths[i]);
        batches.extend(chunk.chunks(batch_size).map(<[usize]>::to_vec));
    }
    batches.shuffle(&mut rng);
    batches
}

/// Batches over epochs without end: epoch `e` is [`bucketed_batches`] with
/// seed `seed + e`. `(epoch, next)` is the whole data position.
#[derive(Debug, Clone)]
pub struct Epochs {
    lengths: Vec<usize>,
    batch_size: usize,
    seed: u64,
    pub epoch: u64,
    pub next: usize,
    order: Vec<Vec<usize>>,
}

impl Epochs {
    pub fn new(lengths: Vec<usize>, batch_size: usize, seed: u64) -> Self {
        let order = bucketed_batches(&lengths, batch_size, seed);
        Self {
            lengths,
            batch_size,
            seed,
            epoch: 0,
            next: 0,
            order,
        }
    }

    /// Moves to data position `(epoch, next)` (a resumed run).
    pub fn seek(&mut self, epoch: u64, next: usize) {
        self.order = bucketed_batches(
            &self.lengths,
            self.batch_size,
            self.seed.wrapping_add(epoch),
        );
        self.epoch = epoch;
        self.next = next;
    }

    /// The next batch's example indices (empty only without examples).
    pub fn next_batch(&mut self) -> Vec<usize> {
        if self.next == self.order.len() {
            self.epoch += 1;
            self.order = bucketed_batches(
                &self.lengths,
                self.batch_size,
                self.seed.wrapping_add(self.epoch),
            );
            self.next = 0;
        }
        let batch = self.order.get(self.next).cloned().unwrap_or_default();
        self.next += 1;
        batch
    }
}

/// A user turn with `text`.
pub fn user(text: &str) -> Vec<Message> {
    vec![Message {
        role: Role::User,
        content: text.to_string(),
    }]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{Prompt, SftPair};

    fn tokenizer() -> ChatTokenizer {
        let corpus = [
            "What is two plus three?",
            "Two plus three is five.",
            "user model",
        ];
        ChatTokenizer::train(corpus.iter(), 100).unwrap()
    }

    fn pair(p: &str, c: &str) -> TrainRecord {
        TrainRecord::Pair(SftPair {
            prompt: Prompt::Text(p.into()),
            completion: c.into(),
            teacher_topk: None,
        })
    }

    #[test]
    fn text_rows_train_on_every_token_after_bos() {
        let t = tokenizer();
        let ex = &encode_records(
            &t,
            &[TrainRecord::Text("two plus three".into())],
            64,
            Overflow::Error,
            LossOn::Completion,
            Path::new("x.jsonl"),
        )
        .unwrap()[0];
        assert_eq!(ex.ids[0], t.bos);
        assert_eq!(*ex.ids.last().unwrap(), t.eos);
        assert!(!ex.target[0] && ex.target[1..].iter().all(|&x| x));
    }

    #[test]
    fn masks_exclude_the_prompt_and_include_the_closing_turn_end() {
        let t = tokenizer();
        let ex = &encode_records(
            &t,
            &[pair("What is two plus three?", "five")],
            64,
            Overflow::Error,
            LossOn::Completion,
            Path::new("x.jsonl"),
        )
        .unwrap()[0];
        let prompt = t.render_prompt(&user("What is two plus three?")).unwrap();
        assert!(ex.target[..prompt.len()].iter().all(|t| !t));
        assert!(ex.target[prompt.len()..].iter().all(|&t| t));
        assert_eq!(*ex.ids.last().unwrap(), t.end_of_turn);
        assert!(*ex.target.last().unwrap());
    }

    #[test]
    fn overflow_is_an_error_or_a_cut() {
        let t = tokenizer();
        let pairs = [
            pair("hi", "five"),
            pair("What is two plus three?", "five five five five"),
        ];
        let path = Path::new("d.jsonl");
        let full =
            encode_records(&t, &pairs, 1000, Overflow::Error, LossOn::Completion, path).unwrap();
        let (short, long) = (full[0].ids.len(), full[1].ids.len());
        assert!(long > short + 2);
        let err = encode_records(&t, &pairs, short, Overflow::Error, LossOn::Completion, path)
            .unwrap_err()
            .to_string();
        let want = format!("d.jsonl: row 2: {long} tokens exceed the context of {short}");
        assert!(err.contains(&want), "{err}");
        let cut = encode_records(
            &t,
            &pairs,
            long - 2,
            Overflow::Truncate,
            LossOn::Completion,
            path,
        )
        .unwrap();
        assert_eq!(cut[0], full[0]);
        assert_eq!(cut[1].ids, full[1].ids[..long - 2]);
        let prompt_len = t
            .render_prompt(&user("What is two plus three?"))
            .unwrap()
            .len();
        let err = encode_records(
            &t,
            &pairs[1..],
            prompt_len,
            Overflow::Truncate,
            LossOn::Completion,
            path,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("nothing left to train on"), "{err}");
    }

    #[test]
    fn topk_rows_must_match_the_completion_tokens() {
        let t = tokenizer();
        let ex = t.render_example(&user("hi"), "five").unwrap();
        let n = ex.targets();
        let with = |rows: usize| {
            TrainRecord::Pair(SftPair {
                prompt: Prompt::Text("hi".into()),
                completion: "five".into(),
                teacher_topk: Some(TopK {
                    ids: vec![vec![1, 2]; rows],
                    logprobs: vec![vec![-0.5, -1.0]; rows],
                }),
            })
        };
        let path = Path::new("p.jsonl");
        let ok = encode_records(
            &t,
            &[with(n)],
            64,
            Overflow::Error,
            LossOn::Completion,
            path,
        )
        .unwrap();
        assert_eq!(ok[0].topk.as_ref().unwrap().ids.len(), n);
        assert_eq!(ok[0].prompt_len(), ex.ids.len() - n);
        let err = encode_records(
            &t,
            &[pair("a", "b"), with(n + 1)],
            64,
            Overflow::Error,
            LossOn::Completion,
            path,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with(&format!(
                "p.jsonl: row 2: {} teacher top-k rows for {n}",
                n + 1
            )),
            "{err}"
        );
        let cut = encode_records(
            &t,
            &[with(n)],
            ex.ids.len() - 1,
            Overflow::Truncate,
            LossOn::Completion,
            path,
        )
        .unwrap();
        assert_eq!(cut[0].topk.as_ref().unwrap().ids.len(), n - 1);
    }

    #[test]
    fn epochs_reshuffle_with_the_next_seed() {
        let lengths: Vec<usize> = (0..10).collect();
        let mut e = Epochs::new(lengths.clone(), 4, 7);
        let first: Vec<Vec<usize>> = (0..3).map(|_| e.next_batch()).collect();
        assert_eq!(first, bucketed_batches(&lengths, 4, 7));
        assert_eq!((e.epoch, e.next), (0, 3));
        assert_eq!(e.next_batch(), bucketed_batches(&lengths, 4, 8)[0]);
        assert_eq!((e.epoch, e.next), (1, 1));
    }

    #[test]
    fn batches_cover_every_example_once_with_similar_lengths() {
        let lengths: Vec<usize> = (0..100).map(|i| (i * 37) % 50 + 1).collect();
        let b = bucketed_batches(&lengths, 8, 3);
        let mut all: Vec<usize> = b.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        assert_eq!(b, bucketed_batches(&lengths, 8, 3));
        assert_ne!(b, bucketed_batches(&lengths, 8, 4));
        let spread: usize = b
            .iter()
            .map(|batch| {
                let l: Vec<usize> = batch.iter().map(|&i| lengths[i]).collect();
                l.iter().max().unwrap() - l.iter().min().unwrap()
            })
            .sum();
        assert!(
            spread < 100 * 8 / 8,
            "bucketing keeps lengths close: {spread}"
        );
    }
}
