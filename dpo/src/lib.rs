//! Preference optimisation of a causal LM on preference pairs: DPO and IPO
//! against a frozen reference, ORPO without one, and their stages in the
//! shared training loop.

pub mod dpo;
pub mod orpo;
pub mod train;

pub use dpo::{DpoLoss, margins, preference_loss};
pub use orpo::{OrpoConfig, odds_ratio_loss, train_orpo};
pub use train::{
    DpoConfig, DpoError, DpoReport, PairExamples, PreferenceStats, encode_preferences, evaluate,
    pair_lengths, train_dpo,
};
