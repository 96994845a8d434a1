use anyhow::{Context, Result, bail};
use posttrain_datasets::LossOn;
use posttrain_model::checkpoint::FrozenDtype;
use posttrain_model::{CheckpointWriter, Gemma2ForCausalLM, Provenance};
use posttrain_sft::{Distill, OnPolicy, check_topk};
use posttrain_train::Vocab;
use posttrain_train::memory::Plan;
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
    // the settings' own check, before anything is loaded
    let kd = if args.kd == KdArg::Live {
        Distill::Live
    } else {
        Distill::None
    };
    let mut settings = args.train.sft_config(kd, &args.distill, &args.lm)?;
    settings.on_policy = Some(on_policy(&args));
    settings.check(args.teacher.is_some())?;
    let lora = args.train.memory.lora.config()?;
    let writer = CheckpointWriter::create(&args.output.out, args.output.overwrite)?;
    let (config, tokenizer) = super::chat_config(&args.model)?;
    let (config, tokenizer) = (&config, &tokenizer);
    let data = super::TrainData::load(
        tokenizer,
        &args.data,
        args.eval.as_deref(),
        config.max_position_embeddings,
        args.lm.truncate,
        LossOn::Completion,
        true,
    )?;
    let (teacher_dtype, teacher_bytes) = match &args.teacher {
        Some(dir) => super::frozen_bytes(dir, &device, args.frozen.weights_dtype)?,
        None => (FrozenDtype::F32, 0),
    };
    let plan = Plan {
        config,
        lora: lora.as_ref(),
        batch: args.train.batch_size,
        longest: data.longest(),
        base: super::base_dtype(&args.model, &device, &args.train.memory)?,
        frozen_bytes: teacher_bytes,
        frozen_dtype: teacher_dtype,
    };
    let memory = super::check_memory(&plan, args.train.memory.force)?;
    let student = super::load_trained_lm(&args.model, &device, &args.train.memory)?;
    let student = super::with_lora("sft", student, lora.as_ref(), args.train.seed);
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
        check_topk(&data.train, config.vocab_size)
            .with_context(|| args.data.display().to_string())?;
    }
    let mut cfg = args.train.sft_config(distill, &args.distill, &args.lm)?;
    cfg.on_policy = Some(on_policy(&args));
    let teacher = match &args.teacher {
        Some(dir) => Some(super::load_teacher(
            dir,
            config,
            tokenizer,
            &device,
            args.frozen.weights_dtype,
        )?),
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
    eprintln!("sft: {memory}");
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
        json!({"train": cfg, "lora": lora, "model": args.model, "data": args.data, "eval": args.eval, "teacher": args.teacher}),
    )?;
    let provenance = Provenance::new("sft", backend, json!({"train": cfg}))
        .with_parent(&args.model)?
        .with_parent(&args.data)?
        .held("base", plan.base.0);
    let provenance = match &args.teacher {
        Some(_) => provenance.held("teacher", teacher_dtype),
        None => provenance,
    };
    let provenance = super::lora_provenance::<Gemma2ForCausalLM>(provenance, lora, &args.model)?;
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

fn on_policy(args: &SftArgs) -> OnPolicy {
    OnPolicy {
        fraction: args.on_policy_fraction,
        beta: args.gkd_beta,
        temperature: args.on_policy_temperature,
        max_new_tokens: args.on_policy_max_new_tokens,
    }
}
