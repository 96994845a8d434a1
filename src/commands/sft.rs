use anyhow::{Context, Result, bail};
use posttrain_datasets::LossOn;
use posttrain_model::{Gemma2Config, Provenance};
use posttrain_sft::{Distill, OnPolicy, SftConfig, check_topk};
use serde_json::json;

use super::training::Training;
use crate::backend::Env;
use crate::cli::{KdArg, SftArgs};

/// Refuses settings that cannot run, before any work.
fn validate(args: &SftArgs) -> Result<()> {
    let lambda = args.on_policy_fraction;
    if !(0.0..=1.0).contains(&lambda) {
        bail!("--on-policy-fraction must be in [0, 1], got {lambda}");
    }
    if !(0.0..=1.0).contains(&args.gkd_beta) {
        bail!("--gkd-beta must be in [0, 1], got {}", args.gkd_beta);
    }
    if args.on_policy_temperature.is_nan() || args.on_policy_temperature <= 0.0 {
        bail!("--on-policy-temperature must be positive");
    }
    let kd = if args.kd == KdArg::Live {
        Distill::Live
    } else {
        Distill::None
    };
    let mut settings = args.train.sft_config(kd, &args.distill, &args.lm)?;
    settings.on_policy = Some(on_policy(args));
    settings.check(args.teacher.is_some())?;
    Ok(())
}

/// The distillation `--kd` asks for, given the data and the teacher.
fn distill(
    args: &SftArgs,
    train: &[posttrain_datasets::Example],
    vocab_size: usize,
) -> Result<Distill> {
    let has_topk = train.iter().all(|e| e.topk.is_some());
    let topk = Distill::TopK {
        rest: args.topk_rest,
    };
    let distill = match (args.kd, &args.teacher) {
        (KdArg::None, _) => Distill::None,
        (KdArg::Live, _) | (KdArg::Auto, Some(_)) => Distill::Live,
        (KdArg::Topk, _) => topk,
        (KdArg::Auto, None) if has_topk => topk,
        (KdArg::Auto, None) => Distill::None,
    };
    if let Distill::TopK { .. } = distill {
        check_topk(train, vocab_size).with_context(|| args.data.display().to_string())?;
    }
    Ok(distill)
}

/// The loop's settings: the distillation `--kd` asks for and on-policy batches.
fn sft_config(
    args: &SftArgs,
    train: &[posttrain_datasets::Example],
    vocab: usize,
) -> Result<SftConfig> {
    let mut cfg = args
        .train
        .sft_config(distill(args, train, vocab)?, &args.distill, &args.lm)?;
    cfg.on_policy = Some(on_policy(args));
    Ok(cfg)
}

pub fn run(args: SftArgs, env: &Env) -> Result<()> {
    validate(&args)?;
    let t = Training::begin("sft", env, &args.output, &args.train)?;
    let (config, tokenizer) = &super::chat_config(&args.model)?;
    let max_len = config.max_position_embeddings;
    let (data, eval) = (&args.data, args.eval.as_deref());
    let completion = LossOn::Completion;
    let data = super::TrainData::load(
        tokenizer,
        data,
        eval,
        max_len,
        args.lm.truncate,
        completion,
        true,
    )?;
    let teacher_held = t.frozen(args.teacher.as_deref(), args.frozen.weights_dtype)?;
    let shape = (args.train.batch_size, data.longest());
    let plan = t.plan(config, shape, Some(&args.model), teacher_held)?;
    t.check_memory(&plan)?;
    let student = t.lm(&args.model)?;
    let cfg = sft_config(&args, &data.train, config.vocab_size)?;
    let dtype = args.frozen.weights_dtype;
    let load = |dir| super::load_teacher(dir, config, tokenizer, &t.device, dtype);
    let teacher = args.teacher.as_deref().map(load).transpose()?;
    eprintln!("sft: {}", describe(&args, config, &data, &cfg));
    let vocab = super::vocab(config, tokenizer);
    let settings = json!({"train": cfg, "lora": t.lora, "model": args.model, "data": args.data,
        "eval": args.eval, "teacher": args.teacher});
    let train = super::lm_loop("sft", teacher.as_ref(), &data, &vocab, &cfg);
    let (model, report, state) = t.run(settings, config, student, train)?;
    let mut provenance = Provenance::new("sft", t.backend, json!({"train": cfg}))
        .with_parent(&args.model)?
        .with_parent(&args.data)?
        .held("base", plan.base.0);
    if args.teacher.is_some() {
        provenance = provenance.held("teacher", teacher_held.0);
    }
    let parents = [args.eval.as_deref(), args.teacher.as_deref()];
    let metrics = serde_json::to_value(&report)?;
    let tables = (config, tokenizer);
    let out = t.finish(
        &model,
        tables,
        provenance,
        &args.model,
        &parents,
        metrics,
        state,
    )?;
    super::print_report("sft", &report, &out);
    Ok(())
}

/// The first line: the run's size and its distillation.
fn describe(
    args: &SftArgs,
    config: &Gemma2Config,
    data: &super::TrainData,
    cfg: &SftConfig,
) -> String {
    let lambda = args.on_policy_fraction;
    format!(
        "{} params, {} train / {} eval pairs, {} steps of {}x{}, distillation: {}{}",
        config.num_params(),
        data.train.len(),
        data.eval.examples.len(),
        cfg.optim.steps,
        cfg.optim.accumulation,
        cfg.batch_size,
        match cfg.distill {
            Distill::None => "none".to_string(),
            Distill::TopK { rest } =>
                format!("stored top-k{}", if rest { " + rest bucket" } else { "" }),
            Distill::Live => "live teacher".to_string(),
        },
        if lambda > 0.0 {
            format!(", on-policy λ={lambda} β={}", args.gkd_beta)
        } else {
            String::new()
        }
    )
}

fn on_policy(args: &SftArgs) -> OnPolicy {
    OnPolicy {
        fraction: args.on_policy_fraction,
        beta: args.gkd_beta,
        temperature: args.on_policy_temperature,
        max_new_tokens: args.on_policy_max_new_tokens,
    }
}
