use anyhow::{Result, bail};
use posttrain_datasets::{read_prompts, write_records};
use posttrain_generate::generate_pairs;
use posttrain_model::Provenance;
use serde_json::json;

use crate::backend::Env;
use crate::cli::GenerateArgs;

pub fn run(args: GenerateArgs, env: &Env) -> Result<()> {
    let (device, backend) = (env.device()?, env.backend());
    super::check_table_output(Some(&args.out), args.overwrite)?;
    let prompts = read_prompts(&args.prompts)?;
    let lm = super::ChatModel::load(&args.model, &device, args.frozen.weights_dtype)?;
    let config = &lm.config;
    if args.topk > config.vocab_size {
        bail!(
            "--topk {} exceeds the vocabulary of {}",
            args.topk,
            config.vocab_size
        );
    }
    let sampling = args.sampling.config(lm.stop_ids())?;
    let report = generate_pairs(
        &lm.model,
        &lm.tokenizer,
        &prompts,
        &sampling,
        args.sampling.batch_size,
        args.topk,
    )?;
    write_records(&args.out, &report.pairs, args.overwrite)?;
    Provenance::new(
        "generate",
        backend,
        json!({ "sampling": format!("{sampling:?}"), "topk": args.topk }),
    )
    .with_parent(&args.model)?
    .with_parent(&args.prompts)?
    .held("model", lm.held)
    .write_beside(&args.out)?;
    eprintln!(
        "generate: {} pairs ({} empty completions left out), {} new tokens -> {}",
        report.pairs.len(),
        report.empty,
        report.new_tokens,
        args.out.display()
    );
    Ok(())
}
