use anyhow::{Result, bail};
use burn::module::Module;
use posttrain_datasets::ChatTokenizer;
use posttrain_datasets::read_prompts;
use posttrain_model::checkpoint::FrozenDtype;
use posttrain_model::{
    CheckpointWriter, Gemma2Config, Gemma2ForCausalLM, Gemma2ForSequenceClassification, Provenance,
};
use posttrain_rlhf::{
    Advantage, Anchor, Inputs, Judge, KlEstimator, KlIn, PromptSet, Reward, RlhfConfig, RlhfReport,
    train_rlhf,
};
use posttrain_train::memory::Plan;
use serde_json::{Value, json};

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

/// Writes the policy, its snapshots and the anchor alike.
struct Writer<'a> {
    args: &'a RlhfArgs,
    cfg: &'a RlhfConfig,
    tables: (&'a Gemma2Config, &'a ChatTokenizer),
    backend: &'a str,
    lora: Option<posttrain_model::LoraConfig>,
    held: [FrozenDtype; 2],
}

impl<'a> Writer<'a> {
    fn new(
        (args, cfg): (&'a RlhfArgs, &'a RlhfConfig),
        tables: (&'a Gemma2Config, &'a ChatTokenizer),
        t: &'a Training<'_>,
        held: [FrozenDtype; 2],
    ) -> Self {
        let (backend, lora) = (t.backend, t.lora.clone());
        Self {
            args,
            cfg,
            tables,
            backend,
            lora,
            held,
        }
    }

    fn provenance(&self, stage: &str) -> Result<Provenance> {
        provenance(stage, self.backend, self.args, self.cfg, self.held)
    }

    fn save(
        &self,
        w: CheckpointWriter,
        model: &Gemma2ForCausalLM,
        stage: &str,
        metrics: Value,
    ) -> Result<std::path::PathBuf> {
        let (args, (config, tokenizer)) = (self.args, self.tables);
        let p = super::lora_provenance::<Gemma2ForCausalLM>(
            self.provenance(stage)?,
            self.lora.clone(),
            &args.policy,
        )?;
        super::finish_checkpoint(
            w,
            model,
            config,
            tokenizer,
            p,
            &[],
            Some(args.seed),
            metrics,
        )
    }

    /// `OUT/snapshots/step-N` while the run trains.
    fn snapshot(
        &self,
        dir: &std::path::Path,
        step: usize,
        model: &Gemma2ForCausalLM,
    ) -> Result<(), String> {
        CheckpointWriter::create(&dir.join(format!("step-{step:06}")), false)
            .map_err(anyhow::Error::from)
            .and_then(|w| self.save(w, model, "rlhf", json!({ "step": step })))
            .map(drop)
            .map_err(|e| format!("{e:#}"))
    }
}

pub fn run(args: RlhfArgs, env: &Env) -> Result<()> {
    let cfg = config(&args)?;
    let t = Training::begin("rlhf", env, &args.output, &args)?;
    let anchor_out = args.anchor_out.as_deref();
    let anchor_out = anchor_out.map(|d| CheckpointWriter::create(d, args.output.overwrite));
    let anchor_out = anchor_out.transpose()?;
    let (config, tokenizer) = &super::chat_config(&args.policy)?;
    let rows = read_prompts(&args.prompts)?;
    let rm_held = t.frozen(args.reward.as_deref(), args.frozen.weights_dtype)?;
    let plan = plan(&t, (&args, &cfg), (config, tokenizer), &rows, rm_held)?;
    t.check_memory(&plan)?;
    let policy = t.lm(&args.policy)?;
    let init = policy.valid();
    let rm = reward_model(&args, &t.device)?;
    let max_len = config.max_position_embeddings;
    let prompts = PromptSet::new(&rows, tokenizer, max_len, &args.prompts)?;
    let prompts = prompts.with_scorer(super::task_scorer);
    let (reward, judged_by) = reward_source(rm.as_ref(), &prompts, &args, &cfg, config)?;
    let vocab = super::vocab(config, tokenizer);
    eprintln!("rlhf: {}", describe(config, &judged_by, &prompts, &cfg));
    let tables = (config, tokenizer);
    let writer = Writer::new((&args, &cfg), tables, &t, [plan.base.0, rm_held.0]);
    let snapshots = t.staging().join("snapshots");
    let mut snapshot = |step, model: &_| writer.snapshot(&snapshots, step, model);
    let inputs = Inputs {
        init: &init,
        reward: &reward,
        prompts: &prompts,
        vocab: &vocab,
    };
    let settings = json!({ "rlhf": cfg, "policy": args.policy, "reward": args.reward,
        "task_reward": args.task_reward, "prompts": args.prompts, "lora": t.lora });
    let carry = Some("snapshots");
    let ((policy, anchor), report, state) =
        t.run_carrying(settings, config, policy, carry, |m, log, resume, saver| {
            let resume = match resume {
                Some((r, state)) => Some((r, state.extra("anchor", &t.device)?)),
                None => None,
            };
            let snapshot = &mut snapshot;
            let (policy, anchor, report) =
                train_rlhf(m, &inputs, &cfg, log, snapshot, resume, saver)?;
            Ok(((policy, anchor), report))
        })?;
    let metrics = serde_json::to_value(&report)?;
    if let Some(w) = anchor_out {
        writer.save(w, &anchor, "rlhf-anchor", metrics.clone())?;
    }
    let provenance = writer.provenance("rlhf")?;
    let base = &args.policy;
    let out = t.finish(&policy, tables, provenance, base, &[], metrics, state)?;
    print_summary(&report, &out);
    Ok(())
}

/// The first line: the policy, what judges it and the step's shape.
fn describe(
    config: &Gemma2Config,
    judged_by: &str,
    prompts: &PromptSet,
    cfg: &RlhfConfig,
) -> String {
    format!(
        "policy {} params, {judged_by}, {} prompts, {} x {} samples per step, {:?} anchor",
        config.num_params(),
        prompts.len(),
        cfg.prompts_per_step,
        cfg.samples,
        cfg.anchor
    )
}

type RewardModel = (Gemma2Config, Gemma2ForSequenceClassification, ChatTokenizer);

/// `--reward`'s model, held as `--weights-dtype` says.
fn reward_model(args: &RlhfArgs, device: &burn::tensor::Device) -> Result<Option<RewardModel>> {
    let dtype = args.frozen.weights_dtype;
    let load = |dir| super::load_reward(dir, device, dtype);
    args.reward.as_deref().map(load).transpose()
}

/// The reward model, or the task scorer (which scores only the task's
/// questions), and how the first line names it.
fn reward_source<'a>(
    rm: Option<&'a RewardModel>,
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
