use anyhow::{Result, bail};
use burn::tensor::Device;
use posttrain_datasets::ChatTokenizer;
use posttrain_model::checkpoint::TOKENIZER_FILE;
use posttrain_model::provenance::PROVENANCE_FILE;
use posttrain_model::{
    CheckpointWriter, Gemma2Config, Gemma2ForCausalLM, Provenance, RandomInit, SaveDtype,
};
use serde_json::json;

use crate::cli::InitArgs;

pub fn run(args: InitArgs, device: Device, backend: &str) -> Result<()> {
    let writer = CheckpointWriter::create(&args.out, args.overwrite)?;
    let config = Gemma2Config::from_file(&args.config)?;
    let tokenizer = ChatTokenizer::from_file(&args.tokenizer)?;
    if tokenizer.vocab_size() > config.vocab_size {
        bail!(
            "{}: tokenizer has {} tokens but {} sets vocab_size {}",
            args.tokenizer.display(),
            tokenizer.vocab_size(),
            args.config.display(),
            config.vocab_size
        );
    }
    let model = Gemma2ForCausalLM::new(&config, &mut RandomInit::new(args.seed), &device)?;
    writer.write_model(&model, &config, SaveDtype::F32)?;
    tokenizer.save(&writer.path().join(TOKENIZER_FILE))?;
    let mut provenance = Provenance::new("init", backend, json!({"config": config}))
        .with_parent(&args.config)?
        .with_parent(&args.tokenizer)?;
    provenance.seed = Some(args.seed);
    writer.write(PROVENANCE_FILE, provenance.to_json().as_bytes())?;
    let out = writer.commit()?;
    eprintln!(
        "init: {} params (seed {}) -> {}",
        config.num_params(),
        args.seed,
        out.display()
    );
    Ok(())
}
