//! Gemma 2 on Burn, numerically matching Hugging Face `transformers`:
//! config, layers, causal LM and reward variants, KV-cached sampling, and
//! checkpoint IO in Hugging Face names and layouts.

mod attention;
pub mod checkpoint;
pub mod config;
mod error;
mod frozen_linear;
pub mod gemma2;
pub mod generate;
mod gumbel;
mod init;
pub mod kernels;
mod layers;
pub mod lm_head;
pub mod lora;
mod pair;
pub mod params;
pub mod provenance;
pub mod quant;
mod quantized_linear;
mod rope;
pub mod safetensors_io;
mod skinny_matmul;
mod tokens;

/// `t` as a constant on the autodiff device `like` (with its gradient
/// checkpointing strategy: operands of one operation must share it).
pub fn on_autodiff<const D: usize>(
    t: burn::tensor::Tensor<D>,
    like: &burn::tensor::Device,
) -> burn::tensor::Tensor<D> {
    let t = t.autodiff();
    match like.gradient_checkpointing_strategy() {
        Some(strategy) => t.with_gradient_checkpointing_strategy(strategy),
        None => t,
    }
}

pub use checkpoint::{
    CheckpointWriter, load_causal_lm, load_config, load_reward_model, load_reward_trunk,
};
pub use config::Gemma2Config;
pub use error::ModelError;
pub use gemma2::{Gemma2ForCausalLM, Gemma2ForSequenceClassification, Gemma2Model, KvCache, Trace};
pub use generate::{
    Completion, FinishReason, SamplingConfig, generate, generate_batches, generate_batches_shared,
    sample_on_device,
};
pub use init::{CheckpointSource, RandomInit};
pub use lora::{Adapter, LoraConfig};
pub use provenance::Provenance;
pub use safetensors_io::{HostTensor, SaveDtype, Weights};
pub use tokens::{Padding, TokenBatch, distinct_shapes, pad_lengths_to};
