use anyhow::Result;
use posttrain_datasets::{read_prompts, write_records};
use posttrain_model::SamplingConfig;
use posttrain_rlhf::{Judge, PromptSet, evaluate};
use serde_json::{Value, json};

use super::{ChatModel, JsonRow};
use crate::backend::Env;
use crate::cli::EvalArgs;

fn cell(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.3}"))
}

pub fn run(args: EvalArgs, env: &Env) -> Result<()> {
    let (device, backend) = (env.device()?, env.backend());
    super::check_table_output(args.out.as_deref(), args.overwrite)?;
    if args.temperature.is_nan() || args.temperature <= 0.0 {
        anyhow::bail!("--temperature must be positive, got {}", args.temperature);
    }
    let prompts = read_prompts(&args.prompts)?;
    let rm = match &args.reward {
        Some(dir) => Some(super::load_reward(dir, &device, args.frozen.weights_dtype)?),
        None => None,
    };
    let judge = rm.as_ref().map(|(config, model, tokenizer)| Judge {
        model,
        tokenizer,
        max_len: config.max_position_embeddings,
        batch_size: args.batch_size,
    });
    let reference = match &args.reference {
        Some(dir) => Some(ChatModel::load(dir, &device, args.frozen.weights_dtype)?.model),
        None => None,
    };
    let mut rows = Vec::new();
    let width = args
        .checkpoints
        .iter()
        .map(|d| d.display().to_string().chars().count())
        .max()
        .unwrap_or(0)
        .max(10);
    // the table goes to stdout as rows are done; a reader that closes the
    // pipe early (`| head`) stops the printing, not the evaluation
    let mut stdout_open = true;
    let mut print = |line: String| {
        if stdout_open {
            stdout_open = crate::print_stdout(&line).is_ok();
        }
    };
    print(format!(
        "{:<width$} {:>8} {:>8} {:>7} {:>8} {:>8} {:>7}\n",
        "checkpoint", "reward", "score", "± se", "accuracy", "kl", "length"
    ));
    for dir in &args.checkpoints {
        let m = ChatModel::load(dir, &device, args.frozen.weights_dtype)?;
        let max_len = m.config.max_position_embeddings;
        let set = PromptSet::new(&prompts, &m.tokenizer, max_len, &args.prompts)?
            .with_scorer(super::task_scorer);
        let vocab = posttrain_train::Vocab {
            tokenizer: &m.tokenizer,
            stop_ids: m.stop_ids(),
            max_len,
        };
        let sampling = SamplingConfig {
            max_new_tokens: args.max_new_tokens,
            temperature: args.temperature,
            seed: args.seed,
            stop_ids: m.stop_ids(),
            ..SamplingConfig::default()
        };
        let e = evaluate(
            &m.model,
            reference.as_ref(),
            judge.as_ref(),
            &set,
            args.samples,
            &sampling,
            &vocab,
            args.batch_size,
        )?;
        print(format!(
            "{:<width$} {:>8} {:>8} {:>7} {:>8} {:>8} {:>7.1}\n",
            dir.display(),
            cell(e.reward),
            cell(e.score),
            cell(e.score_se),
            cell(e.accuracy),
            cell(e.kl),
            e.length
        ));
        let Value::Object(mut row) = json!({ "checkpoint": dir.display().to_string() }) else {
            unreachable!()
        };
        if let Value::Object(fields) = serde_json::to_value(&e)? {
            row.extend(fields);
        }
        rows.push(JsonRow(row));
    }
    if let Some(out) = &args.out {
        write_records(out, &rows, args.overwrite)?;
        let mut provenance = posttrain_model::Provenance::new(
            "eval",
            backend,
            json!({
                "samples": args.samples,
                "temperature": args.temperature,
                "max_new_tokens": args.max_new_tokens,
            }),
        );
        provenance.seed = Some(args.seed);
        for parent in args
            .checkpoints
            .iter()
            .chain([&args.prompts])
            .chain(args.reward.iter())
            .chain(args.reference.iter())
        {
            provenance = provenance.with_parent(parent)?;
        }
        provenance.write_beside(out)?;
        eprintln!("eval: {} checkpoints -> {}", rows.len(), out.display());
    }
    Ok(())
}
