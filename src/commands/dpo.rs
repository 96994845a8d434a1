use std::path::Path;

use anyhow::{Result, bail};
use posttrain_datasets::{ChatTokenizer, Preference, read_records};
use posttrain_dpo::{DpoConfig, DpoLoss, PairExamples, encode_preferences, train_dpo};
use posttrain_model::checkpoint::FrozenDtype;
use posttrain_model::{Gemma2Config, Provenance};
use posttrain_train::memory::Plan;
use serde_json::json;

use super::training::Training;
use crate::backend::Env;
use crate::cli::{DpoArgs, DpoLossArg};

/// Training and held-out preference pairs, rendered for `tokenizer`.
pub fn preference_pairs(
    tokenizer: &ChatTokenizer,
    data: &Path,
    eval: Option<&Path>,
    max_len: usize,
) -> Result<(Vec<PairExamples>, Vec<PairExamples>)> {
    let load = |path: &Path| -> Result<_> {
        let rows: Vec<Preference> = read_records(path)?;
        Ok(encode_preferences(tokenizer, &rows, max_len, path)?)
    };
    Ok((load(data)?, eval.map(load).transpose()?.unwrap_or_default()))
}

/// The memory plan of a preference stage: chosen and rejected sides as one batch.
pub fn preference_plan<'a>(
    t: &'a Training<'_>,
    config: &'a Gemma2Config,
    (train, batch_size): (&[PairExamples], usize),
    policy: &Path,
    frozen: (FrozenDtype, u64),
) -> Result<Plan<'a>> {
    Ok(Plan {
        config,
        lora: t.lora.as_ref(),
        batch: 2 * batch_size,
        longest: posttrain_dpo::pair_lengths(train)
            .into_iter()
            .max()
            .unwrap_or(0),
        base: t.base(policy)?,
        frozen_bytes: frozen.1,
        frozen_dtype: frozen.0,
    })
}

fn config(args: &DpoArgs) -> Result<DpoConfig> {
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
    Ok(cfg)
}

pub fn run(args: DpoArgs, env: &Env) -> Result<()> {
    let cfg = config(&args)?;
    let t = Training::begin("dpo", env, &args.output, &args.train)?;
    let (config, tokenizer) = super::chat_config(&args.policy)?;
    let max_len = config.max_position_embeddings;
    let (train, eval) = preference_pairs(&tokenizer, &args.data, args.eval.as_deref(), max_len)?;
    // a reference of its own, or (full fine-tuning) the policy's frozen copy
    let reference_held = match (&args.reference, &t.lora) {
        (Some(dir), _) => super::frozen_bytes(dir, &t.device, args.frozen.weights_dtype)?,
        (None, None) => (FrozenDtype::F32, 4 * config.num_params() as u64),
        (None, Some(_)) => (FrozenDtype::F32, 0),
    };
    let shape = (&train[..], args.train.batch_size);
    let plan = preference_plan(&t, &config, shape, &args.policy, reference_held)?;
    t.check_memory(&plan)?;
    let policy = t.lm(&args.policy)?;
    let reference = match &args.reference {
        Some(dir) => load_reference(dir, &t.device, &args, &config, &tokenizer)?,
        None => burn::module::Module::valid(&policy),
    };
    let reference_dir = args.reference.as_ref().unwrap_or(&args.policy).display();
    let (params, pairs) = (config.num_params(), (train.len(), eval.len()));
    let (beta, loss) = (cfg.beta, cfg.loss);
    eprintln!(
        "dpo: {params} params, {} train / {} eval pairs, β {beta}, {loss:?} loss, reference {reference_dir}",
        pairs.0, pairs.1
    );
    let settings = json!({ "dpo": cfg, "policy": args.policy, "reference": args.reference,
        "data": args.data, "eval": args.eval, "lora": t.lora });
    let (model, report, state) = t.run(settings, &config, policy, |m, log, resume, saver| {
        let (pairs, pad) = ((&train[..], &eval[..]), tokenizer.pad);
        train_dpo(m, &reference, pairs, pad, &cfg, log, resume, saver)
    })?;
    let mut provenance = Provenance::new("dpo", t.backend, json!({ "dpo": cfg }))
        .with_parent(&args.policy)?
        .with_parent(&args.data)?
        .held("base", plan.base.0);
    if args.reference.is_some() {
        provenance = provenance.held("reference", reference_held.0);
    }
    let parents = [args.eval.as_deref(), args.reference.as_deref()];
    let metrics = serde_json::to_value(&report)?;
    let (tables, policy) = ((&config, &tokenizer), &args.policy);
    let out = t.finish(&model, tables, provenance, policy, &parents, metrics, state)?;
    print_preference_report("dpo", &report.loss, report.eval, &out);
    Ok(())
}

/// A reference checkpoint, refused when its vocabulary differs from the policy's.
fn load_reference(
    dir: &Path,
    device: &burn::tensor::Device,
    args: &DpoArgs,
    config: &Gemma2Config,
    tokenizer: &ChatTokenizer,
) -> Result<posttrain_model::Gemma2ForCausalLM> {
    let r = super::ChatModel::load(dir, device, args.frozen.weights_dtype)?;
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
    Ok(r.model)
}

/// The last line of a preference stage.
pub fn print_preference_report(
    stage: &str,
    loss: &posttrain_train::LossSummary,
    eval: Option<posttrain_dpo::PreferenceStats>,
    out: &Path,
) {
    let eval = eval.map_or(String::new(), |s| {
        format!(
            ", eval reward accuracy {:.3} (margin {:.3})",
            s.accuracy, s.margin
        )
    });
    let (first, last) = (loss.first_loss, loss.last_loss);
    eprintln!(
        "{stage}: loss {first:.4} -> {last:.4}{eval} -> {}",
        out.display()
    );
}
