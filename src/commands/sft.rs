use anyhow::{Result, bail};
use posttrain_datasets::LossOn;
use posttrain_model::{CheckpointWriter, Provenance};
use posttrain_sft::{Distill, OnPolicy};
use posttrain_train::Vocab;
use serde_json::json;

use crate::backend::Env;
use crate::cli::{KdArg, SftArgs};

pub fn run(args: SftArgs, env: &Env) -> Result<()> {
    let (device, backend) = (env.device()?, env.backend());
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
    if lambda > 0.0 && args.teacher.is_none() {
        bail!("--on-policy-fraction needs --teacher (the teacher scores the student's samples)");
    }
    if args.kd == KdArg::Live && args.teacher.is_none() {
        bail!("--kd live needs --teacher");
    }
    let writer = CheckpointWriter::create(&args.output.out, args.output.overwrite)?;
    let super::ChatModel {
        config,
        model: student,
        tokenizer,
    } = super::ChatModel::load(&args.model, &device.clone().autodiff())?;
    let (config, tokenizer) = (&config, &tokenizer);
    let data = super::TrainData::load(
        tokenizer,
        &args.data,
        args.eval.as_deref(),
        config.max_position_embeddings,
        args.train.truncate,
        LossOn::Completion,
        true,
    )?;
    let has_topk = data.train.iter().all(|e| e.topk.is_some());
    let distill = match (args.kd, &args.teacher) {
        (KdArg::None, _) => Distill::None,
        (KdArg::Live, _) | (KdArg::Auto, Some(_)) => Distill::Live,
        (KdArg::Topk, _) => Distill::TopK {
            rest: args.topk_rest,
        },
        (KdArg::Auto, None) if has_topk => Distill::TopK {
            rest: args.topk_rest,
        },
        (KdArg::Auto, None) => Distill::None,
    };
    if let Distill::TopK { .. } = distill {
        check_topk(&data.train, config.vocab_size, &args.data)?;
    }
    let mut cfg = args.train.sft_config(distill, &args.distill)?;
    cfg.on_policy = Some(OnPolicy {
        fraction: lambda,
        beta: args.gkd_beta,
        temperature: args.on_policy_temperature,
        max_new_tokens: args.on_policy_max_new_tokens,
    });
    let teacher = match &args.teacher {
        Some(dir) => Some(super::load_teacher(dir, config, tokenizer, &device)?),
        None => None,
    };
    eprintln!(
        "sft: {} params, {} train / {} eval pairs, {} steps of {}x{}, distillation: {}{}",
        config.num_params(),
        data.train.len(),
        data.eval.examples.len(),
        cfg.optim.steps,
        cfg.optim.accumulation,
        cfg.batch_size,
        match distill {
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
    );
    let vocab = Vocab {
        tokenizer,
        stop_ids: super::stop_ids(config, tokenizer),
        max_len: config.max_position_embeddings,
    };
    let (model, report, state) = super::train_resumable(
        "sft",
        student,
        teacher.as_ref(),
        &data,
        &vocab,
        &cfg,
        &args.train,
        &args.output.out,
        writer.path(),
        config,
        json!({"train": cfg, "model": args.model, "data": args.data, "eval": args.eval, "teacher": args.teacher}),
    )?;
    let provenance = Provenance::new("sft", backend, json!({"train": cfg}))
        .with_parent(&args.model)?
        .with_parent(&args.data)?;
    let out = super::finish_checkpoint(
        writer,
        &model,
        config,
        tokenizer,
        provenance,
        &[args.eval.as_deref(), args.teacher.as_deref()],
        Some(args.train.seed),
        serde_json::to_value(&report)?,
    )?;
    state.remove()?;
    super::print_report("sft", &report, &out);
    Ok(())
}

/// Every row's top-k has the same k, ids inside the vocabulary and finite
/// log-probabilities ≤ 0.
fn check_topk(
    examples: &[posttrain_datasets::Example],
    vocab: usize,
    path: &std::path::Path,
) -> Result<()> {
    let mut k = None;
    for (row, e) in examples.iter().enumerate() {
        let Some(top) = &e.topk else {
            bail!(
                "{}: row {}: no teacher_topk_ids / teacher_topk_logprobs (needed by --kd topk)",
                path.display(),
                row + 1
            );
        };
        for (ids, lps) in top.ids.iter().zip(&top.logprobs) {
            let here = ids.len();
            if *k.get_or_insert(here) != here || lps.len() != here || here == 0 {
                bail!(
                    "{}: row {}: teacher top-k rows of different lengths ({} and {})",
                    path.display(),
                    row + 1,
                    k.unwrap_or(0),
                    here.max(lps.len())
                );
            }
            if let Some(id) = ids.iter().find(|&&i| i as usize >= vocab) {
                bail!(
                    "{}: row {}: teacher top-k id {id} is outside the vocabulary of {vocab}",
                    path.display(),
                    row + 1
                );
            }
            if let Some(lp) = lps.iter().find(|lp| !lp.is_finite() || **lp > 1e-4) {
                bail!(
                    "{}: row {}: teacher top-k log-prob {lp} is not a finite log-probability",
                    path.display(),
                    row + 1
                );
            }
        }
    }
    Ok(())
}
