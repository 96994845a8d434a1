//! Supervised fine-tuning with distillation (completion cross-entropy, KD
//! from stored top-k or a live teacher, on-policy GKD) and the same loop for
//! pretraining.

pub mod ce;
pub mod distill;
pub mod eval;
pub mod gkd;
pub mod sft;
pub mod topk_kd;

pub use ce::cross_entropy;
pub use distill::forward_kl;
pub use eval::{EvalSet, TaskScore, eval_loss};
pub use gkd::generalized_jsd;
pub use sft::{Distill, OnPolicy, SftConfig, SftError, SftReport, check_topk, train_lm};
pub use topk_kd::topk_kl;
