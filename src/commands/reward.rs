use anyhow::{Result, bail};
use posttrain_datasets::{ChatTokenizer, Preference, Record, SftPair, read_records, write_records};
use posttrain_model::checkpoint::{FrozenDtype, TOKENIZER_FILE, load_reward_trunk_as};
use posttrain_model::{
    Gemma2ForSequenceClassification, Padding, Provenance, RandomInit, load_config,
};
use posttrain_reward::{
    PairIds, RewardConfig, RewardReport, encode_pairs, evaluate, scale_config,
    score_examples_shared, train_reward,
};
use serde_json::{Value, json};

use super::JsonRow;
use super::training::Training;
use burn::tensor::Device;
use posttrain_model::Gemma2Config;

use crate::backend::Env;
use crate::cli::{RewardArgs, RewardScoreArgs};

fn load_pairs(
    tokenizer: &ChatTokenizer,
    path: &std::path::Path,
    max_len: usize,
) -> Result<Vec<PairIds>> {
    let prefs: Vec<Preference> = read_records(path)?;
    let ties: Vec<usize> = (0..prefs.len())
        .filter(|&i| prefs[i].chosen == prefs[i].rejected)
        .collect();
    if ties.len() == prefs.len() {
        bail!(
            "{}: every row's `chosen` equals its `rejected`: no preference to learn",
            path.display()
        );
    }
    if let Some(first) = ties.first() {
        eprintln!(
            "warning: {}: {} of {} rows have `chosen` equal to `rejected` (first: row {}); they add nothing but a constant loss",
            path.display(),
            ties.len(),
            prefs.len(),
            first + 1
        );
    }
    let side = |f: fn(&Preference) -> &str| {
        encode_pairs(
            tokenizer,
            prefs.iter().map(|p| (p.prompt.messages(), f(p))),
            max_len,
            path,
        )
    };
    let chosen = side(|p| p.chosen.as_str())?;
    let rejected = side(|p| p.rejected.as_str())?;
    Ok(chosen
        .into_iter()
        .zip(rejected)
        .map(|(chosen, rejected)| PairIds { chosen, rejected })
        .collect())
}

/// The reward model to train: a checkpoint's trunk (`--init`) or new
/// weights scaled from the policy's config; with a line saying which, and
/// the seed of the weights drawn new (`None` when `--init` had a head).
fn initial_model(
    args: &RewardArgs,
    policy: &Gemma2Config,
    device: &Device,
    held: FrozenDtype,
) -> Result<(
    Gemma2Config,
    Gemma2ForSequenceClassification,
    String,
    Option<u64>,
)> {
    let head_seed = args.head_seed.unwrap_or(args.train.seed);
    Ok(match &args.init {
        Some(dir) => {
            let (config, model, fresh) = load_reward_trunk_as(dir, head_seed, device, held)?;
            if config.vocab_size != policy.vocab_size {
                bail!(
                    "{}: vocab_size {} differs from the policy's {}",
                    dir.display(),
                    config.vocab_size,
                    policy.vocab_size
                );
            }
            let head = if fresh {
                format!("new score head of seed {head_seed}")
            } else {
                "its score head".into()
            };
            let drawn = fresh.then_some(head_seed);
            (
                config,
                model,
                format!("from {} ({head})", dir.display()),
                drawn,
            )
        }
        None => {
            let (config, _) = scale_config(policy, args.size_ratio);
            let model = Gemma2ForSequenceClassification::new(
                &config,
                &mut RandomInit::new(head_seed),
                device,
            )?;
            (
                config,
                model,
                format!("new weights for --size-ratio {}", args.size_ratio),
                Some(head_seed),
            )
        }
    })
}

/// Refuses settings that cannot run, before any work.
fn validate(args: &RewardArgs) -> Result<RewardConfig> {
    if !(args.size_ratio > 0.0 && args.size_ratio.is_finite()) {
        bail!("--size-ratio must be positive, got {}", args.size_ratio);
    }
    if args.train.memory.lora.lora_rank.is_some() && args.init.is_none() {
        bail!("--lora-rank needs --init: LoRA adapts an existing checkpoint, not new weights");
    }
    Ok(RewardConfig {
        optim: args.train.optim()?,
        batch_size: args.train.batch_size,
        eval_every: args.train.eval_every,
        seed: args.train.seed,
        margin: args.margin,
    })
}

pub fn run(args: RewardArgs, env: &Env) -> Result<()> {
    let cfg = validate(&args)?;
    let t = Training::begin("reward", env, &args.output, &args.train)?;
    let policy = load_config(&args.policy)?;
    let tokenizer = ChatTokenizer::from_file(&args.policy.join(TOKENIZER_FILE))?;
    let planned = match &args.init {
        Some(dir) => load_config(dir)?,
        None => scale_config(&policy, args.size_ratio).0,
    };
    let max_len = planned.max_position_embeddings;
    let train = load_pairs(&tokenizer, &args.data, max_len)?;
    let eval = args
        .eval
        .as_deref()
        .map(|p| load_pairs(&tokenizer, p, max_len));
    let eval = eval.transpose()?.unwrap_or_default();
    let longest = train.iter().map(|p| p.chosen.len().max(p.rejected.len()));
    let shape = (2 * args.train.batch_size, longest.max().unwrap_or(0));
    let plan = t.plan(&planned, shape, args.init.as_deref(), (FrozenDtype::F32, 0))?;
    t.check_memory(&plan)?;
    let device = super::train_device(&t.device, args.train.memory.checkpoint_activations);
    let (mut config, model, origin, drawn) = initial_model(&args, &policy, &device, plan.base.0)?;
    let ratio = config.num_params() as f64 / policy.num_params() as f64;
    eprintln!(
        "reward: {} params = {ratio:.2}x the policy's {} ({origin}: hidden {}, {} layers), {} train / {} eval pairs",
        config.num_params(),
        policy.num_params(),
        config.hidden_size,
        config.num_hidden_layers,
        train.len(),
        eval.len()
    );
    let architectures = json!(["Gemma2ForSequenceClassification"]);
    config.extra.insert("architectures".into(), architectures);
    config.extra.insert("num_labels".into(), 1.into());
    let model = super::with_lora("reward", model, t.lora.as_ref(), args.train.seed);
    let settings = json!({"train": cfg, "policy": args.policy, "init": args.init, "head_seed": drawn,
        "size_ratio": args.size_ratio, "data": args.data, "eval": args.eval, "lora": t.lora});
    let (model, report, state) = t.run(settings, &config, model, |m, log, resume, saver| {
        let pairs = (train.as_slice(), eval.as_slice());
        train_reward(m, pairs, tokenizer.pad, &cfg, log, resume, saver)
    })?;
    let settings = provenance_settings(&args, &cfg, (&policy, &config), drawn);
    let provenance = Provenance::new("reward", t.backend, settings)
        .with_parent(&args.policy)?
        .with_parent(&args.data)?
        .held("base", plan.base.0);
    let mut metrics = serde_json::to_value(&report)?;
    metrics["size_ratio"] = ratio.into();
    // LoRA implies --init: the adapter's base
    let adapted = args.init.as_deref().unwrap_or(&args.policy);
    let parents = [args.eval.as_deref(), args.init.as_deref()];
    let tables = (&config, &tokenizer);
    let out = t.finish(
        &model, tables, provenance, adapted, &parents, metrics, state,
    )?;
    print_summary(&report, ratio, &out);
    Ok(())
}

fn print_summary(report: &posttrain_train::Run<RewardReport>, ratio: f64, out: &std::path::Path) {
    let eval = report.eval.map_or(String::new(), |s| {
        format!(
            ", eval accuracy {:.3} (gap {:.3} ± {:.3})",
            s.accuracy, s.mean_gap, s.std_gap
        )
    });
    let (first, last) = (report.loss.first_loss, report.loss.last_loss);
    let out = out.display();
    eprintln!("reward: loss {first:.4} -> {last:.4}{eval}, size ratio {ratio:.2}x -> {out}");
}

/// The settings `posttrain.json` records: the run's, the weights' origin and sizes.
fn provenance_settings(
    args: &RewardArgs,
    cfg: &RewardConfig,
    (policy, config): (&Gemma2Config, &Gemma2Config),
    drawn: Option<u64>,
) -> Value {
    json!({
        "train": cfg,
        "init": args.init,
        "head_seed": drawn,
        "size_ratio_requested": args.init.is_none().then_some(args.size_ratio),
        "size_ratio": config.num_params() as f64 / policy.num_params() as f64,
        "policy_params": policy.num_params(),
        "params": config.num_params(),
        "config": config,
    })
}

pub fn score(args: RewardScoreArgs, env: &Env) -> Result<()> {
    super::check_table_output(args.out.as_deref(), args.overwrite)?;
    let device = env.device()?;
    let (config, model, tokenizer) =
        super::load_reward(&args.reward, &device, args.frozen.weights_dtype)?;
    if let Some(pairs) = &args.pairs {
        let ids = load_pairs(&tokenizer, pairs, config.max_position_embeddings)?;
        let stats = evaluate(&model, &ids, tokenizer.pad, args.batch_size, 0.0);
        return crate::print_stdout(&format!("{}\n", serde_json::to_string(&stats)?));
    }
    let input = args.input.expect("clap requires --input without --pairs");
    let rows: Vec<SftPair> = read_records(&input)?;
    let ids = encode_pairs(
        &tokenizer,
        rows.iter()
            .map(|r| (r.prompt.messages(), r.completion.as_str())),
        config.max_position_embeddings,
        &input,
    )?;
    let rewards =
        score_examples_shared(&model, &ids, tokenizer.pad, Padding::Right, args.batch_size);
    let scored: Vec<JsonRow> = rows
        .iter()
        .zip(&rewards)
        .map(|(r, &reward)| {
            let Value::Object(mut row) = r.to_row() else {
                unreachable!("records are objects")
            };
            row.insert("reward".into(), f64::from(reward).into());
            JsonRow(row)
        })
        .collect();
    let mean = rewards.iter().map(|&r| f64::from(r)).sum::<f64>() / rewards.len().max(1) as f64;
    match &args.out {
        Some(out) => {
            write_records(out, &scored, args.overwrite)?;
            eprintln!(
                "score: {} rows, mean reward {mean:.4} -> {}",
                scored.len(),
                out.display()
            );
            Ok(())
        }
        None => {
            let text: String = scored.iter().map(|s| format!("{}\n", s.to_row())).collect();
            crate::print_stdout(&text)
        }
    }
}
