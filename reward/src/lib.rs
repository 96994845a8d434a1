//! The reward model stage: sizing an RM about ten times the policy,
//! Bradley-Terry training on preference pairs and batched scoring.

pub mod bradley_terry;
pub mod score;
pub mod sizing;
pub mod train;

pub use bradley_terry::{PairStats, bradley_terry_loss};
pub use score::{encode_pairs, score_examples, score_examples_shared, score_with_shared_prompts};
pub use sizing::scale_config;
pub use train::{PairIds, RewardConfig, RewardError, RewardReport, evaluate, train_reward};
