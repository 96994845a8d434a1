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

/// A row of the printed table after its checkpoint.
fn cells(e: &posttrain_rlhf::PolicyEval) -> String {
    format!(
        "{:>8} {:>8} {:>7} {:>8} {:>8} {:>7.1}",
        cell(e.reward),
        cell(e.score),
        cell(e.score_se),
        cell(e.accuracy),
        cell(e.kl),
        e.length
    )
}

/// One checkpoint's samples on the prompts, scored, with the KL to the reference.
fn evaluate_one(
    dir: &std::path::Path,
    args: &EvalArgs,
    prompts: &[posttrain_datasets::Prompt],
    (reference, judge): (Option<&posttrain_model::Gemma2ForCausalLM>, Option<&Judge>),
    device: &burn::tensor::Device,
) -> Result<posttrain_rlhf::PolicyEval> {
    let m = ChatModel::load(dir, device, args.frozen.weights_dtype)?;
    let max_len = m.config.max_position_embeddings;
    let set = PromptSet::new(prompts, &m.tokenizer, max_len, &args.prompts)?
        .with_scorer(super::task_scorer);
    let vocab = super::vocab(&m.config, &m.tokenizer);
    let sampling = SamplingConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        seed: args.seed,
        stop_ids: m.stop_ids(),
        ..SamplingConfig::default()
    };
    let (samples, batch) = (args.samples, args.batch_size);
    Ok(evaluate(
        &m.model, reference, judge, &set, samples, &sampling, &vocab, batch,
    )?)
}

/// The table as `--out` (JSONL or Parquet) with its provenance beside it.
fn write_table(
    args: &EvalArgs,
    out: &std::path::Path,
    rows: &[JsonRow],
    backend: &str,
) -> Result<()> {
    write_records(out, rows, args.overwrite)?;
    let settings = json!({
        "samples": args.samples,
        "temperature": args.temperature,
        "max_new_tokens": args.max_new_tokens,
    });
    let mut provenance = posttrain_model::Provenance::new("eval", backend, settings);
    provenance.seed = Some(args.seed);
    let inputs = args.checkpoints.iter().chain([&args.prompts]);
    for parent in inputs
        .chain(args.reward.iter())
        .chain(args.reference.iter())
    {
        provenance = provenance.with_parent(parent)?;
    }
    provenance.write_beside(out)?;
    eprintln!("eval: {} checkpoints -> {}", rows.len(), out.display());
    Ok(())
}

pub fn run(args: EvalArgs, env: &Env) -> Result<()> {
    let (device, backend) = (env.device()?, env.backend());
    super::check_table_output(args.out.as_deref(), args.overwrite)?;
    if args.temperature.is_nan() || args.temperature <= 0.0 {
        anyhow::bail!("--temperature must be positive, got {}", args.temperature);
    }
    let prompts = read_prompts(&args.prompts)?;
    let dtype = args.frozen.weights_dtype;
    let rm = args
        .reward
        .as_deref()
        .map(|d| super::load_reward(d, &device, dtype));
    let rm = rm.transpose()?;
    let judge = rm.as_ref().map(|(config, model, tokenizer)| Judge {
        model,
        tokenizer,
        max_len: config.max_position_embeddings,
        batch_size: args.batch_size,
    });
    let reference = args
        .reference
        .as_deref()
        .map(|d| ChatModel::load(d, &device, dtype));
    let reference = reference.transpose()?.map(|m| m.model);
    let mut rows = Vec::new();
    let names = args.checkpoints.iter().map(|d| d.display().to_string());
    let width = names.map(|n| n.chars().count()).max().unwrap_or(0).max(10);
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
        let models = (reference.as_ref(), judge.as_ref());
        let e = evaluate_one(dir, &args, &prompts, models, &device)?;
        print(format!("{:<width$} {}\n", dir.display(), cells(&e)));
        let Value::Object(mut row) = json!({ "checkpoint": dir.display().to_string() }) else {
            unreachable!()
        };
        if let Value::Object(fields) = serde_json::to_value(&e)? {
            row.extend(fields);
        }
        rows.push(JsonRow(row));
    }
    if let Some(out) = &args.out {
        write_table(&args, out, &rows, backend)?;
    }
    Ok(())
}
