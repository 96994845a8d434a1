//! Pretraining (optionally distilled from a teacher), supervised fine-tuning
//! losses, and the `generate` stage that writes teacher completions.

pub mod distill;
pub mod generate;
pub mod pretrain;

pub use distill::{distillation_loss, forward_kl};
pub use pretrain::{PretrainConfig, PretrainReport, eval_loss, pretrain};
