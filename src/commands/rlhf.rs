use anyhow::{Result, bail};
use burn::module::Module;
use posttrain_datasets::ChatTokenizer;
use posttrain_datasets::read_prompts;
use posttrain_model::checkpoint::FrozenDtype;
use posttrain_model::{
    CheckpointWriter, Gemma2Config, Gemma2ForCausalLM, Gemma2ForSequenceClassification, Provenance,
};
use posttrain_rlhf::{
    Advantage, Anchor, Judge, KlEstimator, KlIn, PromptSet, Reward, RlhfConfig, RlhfReport,
    train_rlhf,
};
use posttrain_train::Vocab;
use serde_json::json;

use crate::backend::Env;
use crate::cli::{AdvantageArg, AnchorArg, KlEstimatorArg, KlInArg, RlhfArgs};

fn config(args: &RlhfArgs) -> Result<RlhfConfig> {
    let cfg = RlhfConfig {
        optim: args.adam.optim(args.steps, args.lr, args.warmup)?,
        prompts_per_step: args.prompts_per_step,
        samples: args.samples,
        temperature: args.temperature,
        max_new_tokens: args.max_new_tokens,
        beta: args.beta,
        advantage: match args.advantage {
            AdvantageArg::Rloo => Advantage::Rloo,
            AdvantageArg::Grpo => Advantage::Grpo,
            AdvantageArg::DrGrpo => Advantage::DrGrpo,
        },
        kl_estimator: match args.kl_estimator {
            KlEstimatorArg::K1 => KlEstimator::K1,
            KlEstimatorArg::K3 => KlEstimator::K3,
        },
        kl_in: match args.kl_in {
            KlInArg::Reward => KlIn::Reward,
            KlInArg::Loss => KlIn::Loss,
        },
        mu: args.mu,
        anchor: match args.anchor {
            AnchorArg::Ema => Anchor::Ema,
            AnchorArg::Sft => Anchor::Sft,
        },
        length_penalty: args.length_penalty,
        max_kl: args.max_kl,
        seed: args.seed,
        batch_size: args.score_batch_size.max(1),
        snapshot_every: args.snapshot_every,
    };
    cfg.check()?;
    // ranks take whole prompt groups
    posttrain_train::dist::world().check_divisible("--prompts-per-step", cfg.prompts_per_step)?;
    Ok(cfg)
}

pub fn run(args: RlhfArgs, env: &Env) -> Result<()> {
    let (device, backend) = (env.device()?, env.backend());
    let cfg = config(&args)?;
    let lora = args.memory.lora.config()?;
    let writer = CheckpointWriter::create(&args.output.out, args.output.overwrite)?;
    let anchor_writer = match &args.anchor_out {
        Some(dir) => Some(CheckpointWriter::create(dir, args.output.overwrite)?),
        None => None,
    };
    let (config, tokenizer) = super::chat_config(&args.policy)?;
    let prompt_rows = read_prompts(&args.prompts)?;
    let (rm_dtype, rm_bytes) = match &args.reward {
        Some(dir) => super::frozen_bytes(dir, &device, args.frozen.weights_dtype)?,
        None => (FrozenDtype::F32, 0),
    };
    // without LoRA the init and the anchor are copies of the policy
    let copies = if lora.is_some() { 0 } else { 2 };
    let plan = posttrain_train::memory::Plan {
        config: &config,
        lora: lora.as_ref(),
        batch: cfg.prompts_per_step * cfg.samples,
        longest: prompt_rows
            .iter()
            .map(|p| {
                tokenizer
                    .render_prompt(&p.messages())
                    .map_or(0, |ids| ids.len())
            })
            .max()
            .unwrap_or(0)
            + cfg.max_new_tokens,
        base: super::base_dtype(&args.policy, &device, &args.memory)?,
        frozen_bytes: rm_bytes + copies * 4 * config.num_params() as u64,
        frozen_dtype: rm_dtype,
    };
    let memory = super::check_memory(&plan, args.memory.force)?;
    let held = [plan.base.0, rm_dtype];
    let policy = super::load_trained_lm(&args.policy, &device, &args.memory)?;
    let policy = super::with_lora("rlhf", policy, lora.as_ref(), args.seed);
    let init = policy.valid();
    let rm = match &args.reward {
        Some(dir) => Some(super::load_reward(dir, &device, args.frozen.weights_dtype)?),
        None => None,
    };
    let max_len = config.max_position_embeddings;
    let policy_params = config.num_params();
    let prompts = PromptSet::new(&prompt_rows, &tokenizer, max_len, &args.prompts)?
        .with_scorer(super::task_scorer);
    let (reward, judged_by) = reward_source(rm.as_ref(), &prompts, &args, &cfg, policy_params)?;
    let vocab = Vocab {
        tokenizer: &tokenizer,
        stop_ids: super::stop_ids(&config, &tokenizer),
        max_len,
    };
    eprintln!(
        "rlhf: policy {policy_params} params, {judged_by}, {} prompts, {} x {} samples per step, {:?} anchor",
        prompts.len(),
        cfg.prompts_per_step,
        cfg.samples,
        cfg.anchor
    );
    eprintln!("rlhf: {memory}");
    let mut state = posttrain_train::StateDir::new(
        &args.output.out,
        json!({
            "rlhf": cfg,
            "policy": args.policy,
            "reward": args.reward,
            "task_reward": args.task_reward,
            "prompts": args.prompts,
            "lora": lora,
        }),
        &config,
        &writer.path().join("metrics.jsonl"),
    );
    state.carry = Some(writer.path().join("snapshots"));
    let (policy, resume, mut log) = state.start("rlhf", args.resume, policy)?;
    let resume = match resume {
        Some(r) => {
            state.restore_carried()?;
            Some((r, state.extra("anchor", &device)?))
        }
        None => None,
    };
    // the policy, its snapshots and the anchor are written the same way
    let save = |w: CheckpointWriter, model: &Gemma2ForCausalLM, stage: &str, metrics| {
        let p = provenance(stage, backend, &args, &cfg, lora.clone(), held)?;
        let seed = Some(args.seed);
        super::finish_checkpoint(w, model, &config, &tokenizer, p, &[], seed, metrics)
    };
    let snapshots = writer.path().join("snapshots");
    let mut snapshot = |step: usize, model: &Gemma2ForCausalLM| {
        CheckpointWriter::create(&snapshots.join(format!("step-{step:06}")), false)
            .map_err(anyhow::Error::from)
            .and_then(|w| save(w, model, "rlhf", json!({ "step": step })))
            .map(drop)
            .map_err(|e| format!("{e:#}"))
    };
    let saver = state.saver(args.save_state_every);
    let (policy, anchor, report) = train_rlhf(
        policy,
        &init,
        &reward,
        &prompts,
        &vocab,
        &cfg,
        &mut log,
        &mut snapshot,
        resume.as_ref().map(|(r, a)| (r, a.clone())),
        Some(saver),
    )?;
    let metrics = serde_json::to_value(&report)?;
    let out = save(writer, &policy, "rlhf", metrics.clone())?;
    if let Some(w) = anchor_writer {
        save(w, &anchor, "rlhf-anchor", metrics)?;
    }
    state.remove()?;
    print_summary(&report, &out);
    Ok(())
}

/// The reward model, or the task scorer (which scores only the task's
/// questions), and how the first line names it.
fn reward_source<'a>(
    rm: Option<&'a (Gemma2Config, Gemma2ForSequenceClassification, ChatTokenizer)>,
    prompts: &PromptSet,
    args: &RlhfArgs,
    cfg: &RlhfConfig,
    policy_params: usize,
) -> Result<(Reward<'a>, String)> {
    Ok(match rm {
        Some((config, model, tokenizer)) => (
            Reward::Model(Judge {
                model,
                tokenizer,
                max_len: config.max_position_embeddings,
                batch_size: cfg.batch_size,
            }),
            format!(
                "reward model {} params ({:.1}x)",
                config.num_params(),
                config.num_params() as f64 / policy_params as f64
            ),
        ),
        None => {
            if let Some(row) = prompts.first_unscored() {
                bail!(
                    "{}: row {}: not a question of the embedded task (--task-reward scores only those)",
                    args.prompts.display(),
                    row + 1
                );
            }
            (Reward::Scorer, "the task scorer as reward".to_string())
        }
    })
}

fn provenance(
    stage: &str,
    backend: &str,
    args: &RlhfArgs,
    cfg: &RlhfConfig,
    lora: Option<posttrain_model::LoraConfig>,
    held: [FrozenDtype; 2],
) -> Result<Provenance> {
    let mut p = Provenance::new(
        stage,
        backend,
        json!({ "rlhf": cfg, "task_reward": args.task_reward }),
    )
    .with_parent(&args.policy)?
    .held("base", held[0]);
    if let Some(rm) = &args.reward {
        p = p.with_parent(rm)?.held("reward", held[1]);
    }
    let p = p.with_parent(&args.prompts)?;
    super::lora_provenance::<Gemma2ForCausalLM>(p, lora, &args.policy)
}

fn print_summary(report: &posttrain_train::Run<RlhfReport>, out: &std::path::Path) {
    let score = match (report.first_score, report.last_score) {
        (Some(a), Some(b)) => format!(", true score {a:.3} -> {b:.3}"),
        _ => String::new(),
    };
    eprintln!(
        "rlhf: {} steps, reward {:.3} -> {:.3}{score}, KL to init {:.3}, rollout {:.0} s, reward {:.0} s, reference log-probs {:.0} s, update {:.0} s -> {}",
        report.steps,
        report.first_reward,
        report.last_reward,
        report.last_kl_init,
        report.rollout_s,
        report.reward_s,
        report.logprob_s,
        report.update_s,
        out.display()
    );
}
