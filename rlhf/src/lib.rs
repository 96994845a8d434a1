//! Policy-gradient RLHF as WARP's first stage: REINFORCE with a
//! leave-one-out baseline on a reward shaped by the KL to an EMA anchor;
//! and the evaluation of policies (reward, true score, KL, length).

pub mod eval;
pub mod grpo;
pub mod kl_estimators;
pub mod rlhf;
pub mod rloo;
pub mod rollout;

pub use eval::{PolicyEval, evaluate};
pub use grpo::Advantage;
pub use kl_estimators::{KlEstimator, KlIn};
pub use posttrain_train::logprobs::logprob_sums;
pub use posttrain_train::rollout::{PromptSet, Rollouts, Scorer, roll_out};
pub use rlhf::{Anchor, Inputs, RlhfConfig, RlhfError, RlhfReport, train_rlhf};
pub use rloo::{policy_gradient_loss, rloo_advantages, shaped_reward};
pub use rollout::{Judge, Reward};
