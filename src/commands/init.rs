use anyhow::Result;
use posttrain_datasets::ChatTokenizer;
use posttrain_model::{CheckpointWriter, Gemma2Config, Gemma2ForCausalLM, Provenance, RandomInit};
use serde_json::json;

use crate::backend::Env;
use crate::cli::InitArgs;

pub fn run(args: InitArgs, env: &Env) -> Result<()> {
    let (device, backend) = (env.device()?, env.backend());
    let writer = CheckpointWriter::create(&args.output.out, args.output.overwrite)?;
    let config = Gemma2Config::from_file(&args.config)?;
    let tokenizer = ChatTokenizer::from_file(&args.tokenizer)?;
    super::check_tokenizer_fits(&tokenizer, &args.tokenizer, &config, &args.config)?;
    let model = Gemma2ForCausalLM::new(&config, &mut RandomInit::new(args.seed), &device)?;
    let provenance = Provenance::new("init", backend, json!({"config": config}))
        .with_parent(&args.config)?
        .with_parent(&args.tokenizer)?;
    let out = super::finish_checkpoint(
        writer,
        &model,
        &config,
        &tokenizer,
        provenance,
        &[],
        Some(args.seed),
        json!({}),
    )?;
    eprintln!(
        "init: {} params (seed {}) -> {}",
        config.num_params(),
        args.seed,
        out.display()
    );
    Ok(())
}
