use anyhow::{Result, bail};
use posttrain_datasets::{Preference, read_records};
use posttrain_dpo::{DpoConfig, DpoLoss, encode_preferences, train_dpo};
use posttrain_model::checkpoint::FrozenDtype;
use posttrain_model::{CheckpointWriter, Provenance};
use serde_json::json;

use crate::backend::Env;
use crate::cli::{DpoArgs, DpoLossArg};

pub fn run(args: DpoArgs, env: &Env) -> Result<()> {
    let (device, backend) = (env.device()?, env.backend());
    let cfg = DpoConfig {
        optim: args.train.optim()?,
        batch_size: args.train.batch_size,
        eval_every: args.train.eval_every,
        seed: args.train.seed,
        beta: args.beta,
        loss: match args.loss {
            DpoLossArg::Sigmoid => DpoLoss::Sigmoid,
            DpoLossArg::Ipo => DpoLoss::Ipo,
        },
        label_smoothing: args.label_smoothing,
    };
    cfg.check()?;
    let lora = args.train.memory.lora.config()?;
    let writer = CheckpointWriter::create(&args.output.out, args.output.overwrite)?;
    let (config, tokenizer) = super::chat_config(&args.policy)?;
    let (config, tokenizer) = (&config, &tokenizer);
    let max_len = config.max_position_embeddings;
    let load = |path: &std::path::Path| -> Result<_> {
        let rows: Vec<Preference> = read_records(path)?;
        Ok(encode_preferences(tokenizer, &rows, max_len, path)?)
    };
    let train = load(&args.data)?;
    let eval = match &args.eval {
        Some(path) => load(path)?,
        None => Vec::new(),
    };
    // a reference of its own, or (full fine-tuning) the policy's frozen copy
    let (reference_dtype, reference_bytes) = match (&args.reference, &lora) {
        (Some(dir), _) => super::frozen_bytes(dir, &device, args.frozen.weights_dtype)?,
        (None, None) => (FrozenDtype::F32, 4 * config.num_params() as u64),
        (None, Some(_)) => (FrozenDtype::F32, 0),
    };
    let base = super::base_dtype(&args.policy, &device, &args.train.memory)?;
    let plan = posttrain_train::memory::Plan {
        config,
        lora: lora.as_ref(),
        batch: 2 * args.train.batch_size,
        longest: train
            .iter()
            .map(|p| p.chosen.ids.len().max(p.rejected.ids.len()))
            .max()
            .unwrap_or(0),
        base,
        frozen_bytes: reference_bytes,
        frozen_dtype: reference_dtype,
    };
    let memory = super::check_memory(&plan, args.train.memory.force)?;
    let policy = super::load_trained_lm(&args.policy, &device, &args.train.memory)?;
    let reference = match &args.reference {
        Some(dir) => {
            let r = super::ChatModel::load(dir, &device, args.frozen.weights_dtype)?;
            if r.config.vocab_size != config.vocab_size
                || r.tokenizer.vocab_size() != tokenizer.vocab_size()
            {
                bail!(
                    "{}: reference vocabulary ({} ids, tokenizer {}) differs from the policy's ({} ids, tokenizer {})",
                    dir.display(),
                    r.config.vocab_size,
                    r.tokenizer.vocab_size(),
                    config.vocab_size,
                    tokenizer.vocab_size()
                );
            }
            r.model
        }
        None => burn::module::Module::valid(&policy),
    };
    let policy_model = super::with_lora("dpo", policy, lora.as_ref(), args.train.seed);
    eprintln!(
        "dpo: {} params, {} train / {} eval pairs, β {}, {:?} loss, reference {}",
        config.num_params(),
        train.len(),
        eval.len(),
        cfg.beta,
        cfg.loss,
        args.reference.as_deref().unwrap_or(&args.policy).display()
    );
    eprintln!("dpo: {memory}");
    let state = posttrain_train::StateDir::new(
        &args.output.out,
        json!({
            "dpo": cfg,
            "policy": args.policy,
            "reference": args.reference,
            "data": args.data,
            "eval": args.eval,
            "lora": lora,
        }),
        config,
        &writer.path().join("metrics.jsonl"),
    );
    let (model, resume, mut log) = state.start("dpo", args.train.resume, policy_model)?;
    let saver = state.saver(args.train.save_state_every);
    let (model, report) = train_dpo(
        model,
        &reference,
        (&train, &eval),
        tokenizer.pad,
        &cfg,
        &mut log,
        resume.as_ref(),
        Some(saver),
    )?;
    let provenance = Provenance::new("dpo", backend, json!({ "dpo": cfg }))
        .with_parent(&args.policy)?
        .with_parent(&args.data)?
        .held("base", base.0);
    let provenance = match &args.reference {
        Some(_) => provenance.held("reference", reference_dtype),
        None => provenance,
    };
    let provenance = super::lora_provenance::<posttrain_model::Gemma2ForCausalLM>(
        provenance,
        lora,
        &args.policy,
    )?;
    let out = super::finish_checkpoint(
        writer,
        &model,
        config,
        tokenizer,
        provenance,
        &[args.eval.as_deref(), args.reference.as_deref()],
        Some(args.train.seed),
        serde_json::to_value(&report)?,
    )?;
    state.remove()?;
    let eval = report.eval.map_or(String::new(), |s| {
        format!(
            ", eval reward accuracy {:.3} (margin {:.3})",
            s.accuracy, s.margin
        )
    });
    let (first, last) = (report.loss.first_loss, report.loss.last_loss);
    eprintln!(
        "dpo: loss {first:.4} -> {last:.4}{eval} -> {}",
        out.display()
    );
    Ok(())
}
