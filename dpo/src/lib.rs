//! Direct preference optimisation of a causal LM on preference pairs
//! against a frozen reference: the DPO and IPO losses, and their stage in
//! the shared training loop.

pub mod dpo;
pub mod train;

pub use dpo::{DpoLoss, margins, preference_loss};
pub use train::{
    DpoConfig, DpoError, DpoReport, PairExamples, PreferenceStats, encode_preferences, evaluate,
    train_dpo,
};
