pub mod bench;
pub mod convert;
pub mod data;
pub mod generate;
pub mod inspect;
pub mod logits;
pub mod pretrain;
pub mod sample;
pub mod tokenizer;

/// Checks, before any work, that an output will not silently replace a file.
pub fn refuse_existing(out: Option<&std::path::Path>, overwrite: bool) -> anyhow::Result<()> {
    match out {
        Some(path) if path.exists() && !overwrite => anyhow::bail!(
            "{}: already exists (pass --overwrite to replace it)",
            path.display()
        ),
        _ => Ok(()),
    }
}

/// A causal LM checkpoint with its tokenizer, checked to fit together.
pub struct ChatModel {
    pub config: posttrain_model::Gemma2Config,
    pub model: posttrain_model::Gemma2ForCausalLM,
    pub tokenizer: posttrain_datasets::ChatTokenizer,
}

impl ChatModel {
    pub fn load(dir: &std::path::Path, device: &burn::tensor::Device) -> anyhow::Result<Self> {
        let (config, model) = posttrain_model::load_causal_lm(dir, device)?;
        let path = dir.join(posttrain_model::checkpoint::TOKENIZER_FILE);
        let tokenizer = posttrain_datasets::ChatTokenizer::from_file(&path)?;
        if tokenizer.vocab_size() > config.vocab_size {
            anyhow::bail!(
                "{}: tokenizer has {} tokens but the model's vocab_size is {}",
                path.display(),
                tokenizer.vocab_size(),
                config.vocab_size
            );
        }
        Ok(Self {
            config,
            model,
            tokenizer,
        })
    }

    /// Generation stops at the config's EOS ids, `<eos>` and `<end_of_turn>`.
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut stop = self.config.eos_ids();
        stop.extend([self.tokenizer.eos, self.tokenizer.end_of_turn]);
        stop
    }
}
