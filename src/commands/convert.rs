use std::time::Instant;

use anyhow::{Result, bail};
use posttrain_datasets::tokenizer::{SPECIAL_TOKENS_FILE, TOKENIZER_CONFIG_FILE};
use posttrain_model::checkpoint::TOKENIZER_FILE;
use posttrain_model::params::named_params;
use posttrain_model::provenance::PROVENANCE_FILE;
use posttrain_model::{CheckpointWriter, Provenance, SaveDtype, load_causal_lm, load_reward_model};

use crate::backend::Env;
use crate::cli::{ConvertArgs, DtypeArg};

pub fn run(args: ConvertArgs, env: &Env) -> Result<()> {
    let (device, backend) = (env.device()?, env.backend());
    if args.shards == 0 {
        bail!("--shards must be at least 1");
    }
    let dtype = match args.dtype {
        DtypeArg::F32 => SaveDtype::F32,
        DtypeArg::Bf16 => SaveDtype::Bf16,
        DtypeArg::F16 => SaveDtype::F16,
    };
    let t0 = Instant::now();
    let writer = CheckpointWriter::create(&args.output.out, args.output.overwrite)?;
    let (config, tensors) = if args.reward_model {
        let (c, m) = load_reward_model(&args.model, &device)?;
        (c, named_params(&m))
    } else {
        let (c, m) = load_causal_lm(&args.model, &device)?;
        (c, named_params(&m))
    };
    writer.write_weights(&config, &tensors, dtype, args.shards)?;
    let provenance = Provenance::new(
        "convert",
        backend,
        serde_json::json!({
            "dtype": format!("{:?}", args.dtype).to_lowercase(),
            "shards": args.shards,
            "reward": args.reward_model,
        }),
    )
    .with_parent(&args.model)?;
    writer.write(PROVENANCE_FILE, provenance.to_json().as_bytes())?;
    for file in [TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE] {
        writer.copy_from(&args.model, file)?;
    }
    writer.copy_from(&args.model, "generation_config.json")?;
    let out = writer.commit()?;
    eprintln!(
        "convert: {} tensors -> {} ({:?}, {} shard(s)) in {:.1}s",
        tensors.len(),
        out.display(),
        args.dtype,
        args.shards,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
