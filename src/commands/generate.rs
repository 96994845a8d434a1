use anyhow::{Result, bail};
use burn::tensor::Device;
use posttrain_datasets::{ChatTokenizer, read_prompts, write_records};
use posttrain_model::checkpoint::TOKENIZER_FILE;
use posttrain_model::load_causal_lm;
use posttrain_sft::generate::generate_pairs;

use crate::cli::GenerateArgs;

pub fn run(args: GenerateArgs, device: Device) -> Result<()> {
    super::refuse_existing(Some(&args.out), args.overwrite)?;
    let prompts = read_prompts(&args.prompts)?;
    let (config, model) = load_causal_lm(&args.model, &device)?;
    let tokenizer = ChatTokenizer::from_file(&args.model.join(TOKENIZER_FILE))?;
    if args.topk > config.vocab_size {
        bail!(
            "--topk {} exceeds the vocabulary of {}",
            args.topk,
            config.vocab_size
        );
    }
    let mut stop = config.eos_ids();
    stop.extend([tokenizer.eos, tokenizer.end_of_turn]);
    let sampling = args.sampling.config(stop)?;
    let report = generate_pairs(
        &model,
        &tokenizer,
        &prompts,
        &sampling,
        args.sampling.batch_size,
        args.topk,
    )?;
    write_records(&args.out, &report.pairs, args.overwrite)?;
    eprintln!(
        "generate: {} pairs ({} empty completions left out), {} new tokens -> {}",
        report.pairs.len(),
        report.empty,
        report.new_tokens,
        args.out.display()
    );
    Ok(())
}
