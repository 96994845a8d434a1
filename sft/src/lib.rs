//! Supervised fine-tuning with distillation (completion cross-entropy, KD
//! from stored top-k or a live teacher, on-policy GKD), the same loop for
//! pretraining, and the `generate` stage that writes teacher completions.

pub mod ce;
pub mod distill;
pub mod eval;
pub mod generate;
pub mod gkd;
pub mod sft;
pub mod topk_kd;

pub use ce::cross_entropy;
pub use distill::forward_kl;
pub use eval::{EvalSet, TaskScore, eval_loss};
pub use gkd::generalized_jsd;
pub use sft::{Distill, OnPolicy, SftConfig, SftError, SftReport, check_topk, train_lm};
pub use topk_kd::topk_kl;
