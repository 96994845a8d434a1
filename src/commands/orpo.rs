use anyhow::Result;
use posttrain_dpo::{OrpoConfig, train_orpo};
use posttrain_model::{Provenance, checkpoint::FrozenDtype};
use serde_json::json;

use super::dpo::{preference_pairs, preference_plan, print_preference_report};
use super::training::Training;
use crate::backend::Env;
use crate::cli::OrpoArgs;

pub fn run(args: OrpoArgs, env: &Env) -> Result<()> {
    let cfg = OrpoConfig {
        optim: args.train.optim()?,
        batch_size: args.train.batch_size,
        eval_every: args.train.eval_every,
        seed: args.train.seed,
        lambda: args.lambda,
    };
    let t = Training::begin("orpo", env, &args.output, &args.train)?;
    let (config, tokenizer) = super::chat_config(&args.policy)?;
    let max_len = config.max_position_embeddings;
    let (train, eval) = preference_pairs(&tokenizer, &args.data, args.eval.as_deref(), max_len)?;
    let shape = (&train[..], args.train.batch_size);
    let plan = preference_plan(&t, &config, shape, &args.policy, (FrozenDtype::F32, 0))?;
    t.check_memory(&plan)?;
    let policy = t.lm(&args.policy)?;
    let (params, n) = (config.num_params(), (train.len(), eval.len()));
    eprintln!(
        "orpo: {params} params, {} train / {} eval pairs, λ {}",
        n.0, n.1, cfg.lambda
    );
    let settings = json!({ "orpo": cfg, "policy": args.policy, "data": args.data,
        "eval": args.eval, "lora": t.lora });
    let (model, report, state) = t.run(settings, &config, policy, |m, log, resume, saver| {
        let pairs = (train.as_slice(), eval.as_slice());
        train_orpo(m, pairs, tokenizer.pad, &cfg, log, resume, saver)
    })?;
    let provenance = Provenance::new("orpo", t.backend, json!({ "orpo": cfg }))
        .with_parent(&args.policy)?
        .with_parent(&args.data)?
        .held("base", plan.base.0);
    let metrics = serde_json::to_value(&report)?;
    let (tables, parents, base) = ((&config, &tokenizer), [args.eval.as_deref()], &args.policy);
    let out = t.finish(&model, tables, provenance, base, &parents, metrics, state)?;
    print_preference_report("orpo", &report.loss, report.eval, &out);
    Ok(())
}
