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
use posttrain_train::memory::Plan;
use serde_json::json;

use super::training::{RunArgs, Training};
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

impl<'a> From<&'a RlhfArgs> for RunArgs<'a> {
    fn from(a: &'a RlhfArgs) -> Self {
        Self {
            memory: &a.memory,
            seed: a.seed,
            resume: a.resume,
            save_state_every: a.save_state_every,
        }
    }
}

/// The memory plan: K samples of each prompt of a step, the reward model
/// and, without LoRA, the init's and the anchor's copies of the policy.
fn plan<'a>(
    t: &'a Training<'_>,
    (args, cfg): (&RlhfArgs, &RlhfConfig),
    (config, tokenizer): (&'a Gemma2Config, &ChatTokenizer),
    prompts: &[posttrain_datasets::Prompt],
    rm: (FrozenDtype, u64),
) -> Result<Plan<'a>> {
    let longest = prompts
        .iter()
        .map(|p| {
            tokenizer
                .render_prompt(&p.messages())
                .map_or(0, |ids| ids.len())
        })
        .max()
        .unwrap_or(0);
    let copies = if t.lora.is_some() { 0 } else { 2 };
    Ok(Plan {
        config,
        lora: t.lora.as_ref(),
        batch: cfg.prompts_per_step * cfg.samples,
        longest: longest + cfg.max_new_tokens,
        base: t.base(&args.policy)?,
        frozen_bytes: rm.1 + copies * 4 * config.num_params() as u64,
        frozen_dtype: rm.0,
    })
}

pub fn run(args: RlhfArgs, env: &Env) -> Result<()> {
    let cfg = config(&args)?;
    let t = Training::begin("rlhf", env, &args.output, &args)?;
    let anchor_writer = match &args.anchor_out {
        Some(dir) => Some(CheckpointWriter::create(dir, args.output.overwrite)?),
        None => None,
    };
    let (config, tokenizer) = super::chat_config(&args.policy)?;
    let prompt_rows = read_prompts(&args.prompts)?;
    let rm_held = match &args.reward {
        Some(dir) => super::frozen_bytes(dir, &t.device, args.frozen.weights_dtype)?,
        None => (FrozenDtype::F32, 0),
    };
    let plan = plan(
        &t,
        (&args, &cfg),
        (&config, &tokenizer),
        &prompt_rows,
        rm_held,
    )?;
    t.check_memory(&plan)?;
    let held = [plan.base.0, rm_held.0];
    let policy = t.lm(&args.policy)?;
    let init = policy.valid();
    let rm = match &args.reward {
        Some(dir) => Some(super::load_reward(
            dir,
            &t.device,
            args.frozen.weights_dtype,
        )?),
        None => None,
    };
    let max_len = config.max_position_embeddings;
    let prompts = PromptSet::new(&prompt_rows, &tokenizer, max_len, &args.prompts)?
        .with_scorer(super::task_scorer);
    let (reward, judged_by) = reward_source(rm.as_ref(), &prompts, &args, &cfg, &config)?;
    let vocab = Vocab {
        tokenizer: &tokenizer,
        stop_ids: super::stop_ids(&config, &tokenizer),
        max_len,
    };
    eprintln!(
        "rlhf: policy {} params, {judged_by}, {} prompts, {} x {} samples per step, {:?} anchor",
        config.num_params(),
        prompts.len(),
        cfg.prompts_per_step,
        cfg.samples,
        cfg.anchor
    );
    // the policy's snapshots and the anchor are written as the policy is
    let save = |w: CheckpointWriter, model: &Gemma2ForCausalLM, stage: &str, metrics| {
        let p = provenance(stage, t.backend, &args, &cfg, held)?;
        let p = super::lora_provenance::<Gemma2ForCausalLM>(p, t.lora.clone(), &args.policy)?;
        super::finish_checkpoint(
            w,
            model,
            &config,
            &tokenizer,
            p,
            &[],
            Some(args.seed),
            metrics,
        )
    };
    let snapshots = t.staging().join("snapshots");
    let mut snapshot = |step: usize, model: &Gemma2ForCausalLM| {
        CheckpointWriter::create(&snapshots.join(format!("step-{step:06}")), false)
            .map_err(anyhow::Error::from)
            .and_then(|w| save(w, model, "rlhf", json!({ "step": step })))
            .map(drop)
            .map_err(|e| format!("{e:#}"))
    };
    let settings = json!({ "rlhf": cfg, "policy": args.policy, "reward": args.reward,
        "task_reward": args.task_reward, "prompts": args.prompts, "lora": t.lora });
    let carry = Some("snapshots");
    let ((policy, anchor), report, state) =
        t.run_carrying(settings, &config, policy, carry, |m, log, resume, saver| {
            let resume = resume
                .map(|(r, state)| Ok::<_, anyhow::Error>((r, state.extra("anchor", &t.device)?)));
            let resume = resume.transpose()?;
            let (policy, anchor, report) = train_rlhf(
                m,
                &init,
                &reward,
                &prompts,
                &vocab,
                &cfg,
                log,
                &mut snapshot,
                resume,
                saver,
            )?;
            Ok(((policy, anchor), report))
        })?;
    let metrics = serde_json::to_value(&report)?;
    if let Some(w) = anchor_writer {
        save(w, &anchor, "rlhf-anchor", metrics.clone())?;
    }
    let provenance = provenance("rlhf", t.backend, &args, &cfg, held)?;
    let tables = (&config, &tokenizer);
    let out = t.finish(
        &policy,
        tables,
        provenance,
        &args.policy,
        &[],
        metrics,
        state,
    )?;
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
    policy: &Gemma2Config,
) -> Result<(Reward<'a>, String)> {
    let policy_params = policy.num_params();
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
    held: [FrozenDtype; 2],
) -> Result<Provenance> {
    let settings = json!({ "rlhf": cfg, "task_reward": args.task_reward });
    let mut p = Provenance::new(stage, backend, settings)
        .with_parent(&args.policy)?
        .held("base", held[0]);
    if let Some(rm) = &args.reward {
        p = p.with_parent(rm)?.held("reward", held[1]);
    }
    Ok(p.with_parent(&args.prompts)?)
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
