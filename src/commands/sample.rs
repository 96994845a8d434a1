use anyhow::{Result, bail};
use posttrain_datasets::{Prompt, read_prompts};
use posttrain_files::write_atomic;
use posttrain_model::{SamplingConfig, generate_batches_shared};
use posttrain_train::Progress;

use crate::backend::Env;
use crate::cli::{SampleArgs, SamplingArgs};

impl SamplingArgs {
    pub fn config(&self, stop_ids: Vec<u32>) -> Result<SamplingConfig> {
        if self.temperature.is_nan() || self.temperature < 0.0 {
            bail!("--temperature must be >= 0, got {}", self.temperature);
        }
        if self.top_p.is_nan() || self.top_p <= 0.0 || self.top_p > 1.0 {
            bail!("--top-p must be in (0, 1], got {}", self.top_p);
        }
        if self.batch_size == 0 {
            bail!("--batch-size must be positive");
        }
        Ok(SamplingConfig {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
            stop_ids,
        })
    }
}

/// Each prompt's ids (rendered, or `<bos>` + its text with `--raw`), refused
/// when the prompt and the new tokens exceed the model's context.
fn encode(args: &SampleArgs, lm: &super::ChatModel, prompts: &[Prompt]) -> Result<Vec<Vec<u32>>> {
    let (config, tokenizer) = (&lm.config, &lm.tokenizer);
    let mut encoded = Vec::with_capacity(prompts.len());
    for (i, p) in prompts.iter().enumerate() {
        let ids = if args.raw {
            let mut ids = vec![tokenizer.bos];
            ids.extend(tokenizer.encode(p.display())?);
            ids
        } else {
            tokenizer.render_prompt(&p.messages())?
        };
        let total = ids.len() + args.sampling.max_new_tokens;
        if total > config.max_position_embeddings {
            bail!(
                "prompt {}: {} prompt tokens + {} new exceed the model's context of {}",
                i + 1,
                ids.len(),
                args.sampling.max_new_tokens,
                config.max_position_embeddings
            );
        }
        encoded.push(ids);
    }
    Ok(encoded)
}

pub fn run(args: SampleArgs, env: &Env) -> Result<()> {
    let device = env.device()?;
    super::refuse_existing(args.out.as_deref(), args.overwrite)?;
    let prompts = match (&args.prompts, &args.prompt) {
        (Some(path), _) => read_prompts(path)?,
        (None, Some(text)) => vec![Prompt::Text(text.clone())],
        (None, None) => bail!("give --prompts FILE or --prompt TEXT"),
    };
    let lm = super::ChatModel::load(&args.model, &device, args.frozen.weights_dtype)?;
    let (config, model, tokenizer) = (&lm.config, &lm.model, &lm.tokenizer);
    let encoded = encode(&args, &lm, &prompts)?;
    let sampling = args.sampling.config(lm.stop_ids())?;

    let mut lines = Vec::new();
    let mut progress = Progress::new("sample", prompts.len() as u64, "prompts");
    let batch_size = args.sampling.batch_size;
    generate_batches_shared(
        model,
        &encoded,
        config.pad_id(),
        &sampling,
        batch_size,
        |first, out| {
            let mut new_tokens = 0;
            for (k, completion) in out.iter().enumerate() {
                let p = &prompts[first + k];
                new_tokens += completion.tokens.len() as u64;
                let row = serde_json::json!({
                    "prompt": p.display(),
                    "completion": tokenizer.decode(completion.answer())?,
                    "finish_reason": completion.finish,
                    "completion_tokens": completion.tokens.len(),
                });
                lines.push(row.to_string());
            }
            progress.advance(out.len() as u64, new_tokens);
            anyhow::Ok(())
        },
    )?;
    progress.finish();
    let mut text = lines.join("\n");
    text.push('\n');
    match &args.out {
        Some(path) => write_atomic(path, text.as_bytes(), args.overwrite)?,
        None => crate::print_stdout(&text)?,
    }
    Ok(())
}
