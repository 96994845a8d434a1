use anyhow::{Result, bail};
use posttrain_datasets::{ChatTokenizer, LossOn};
use posttrain_model::{Gemma2Config, Gemma2ForCausalLM, Provenance, RandomInit};
use posttrain_sft::{Distill, SftConfig};
use posttrain_train::OptimConfig;
use serde_json::json;

use super::training::Training;
use crate::backend::Env;
use crate::cli::{AdamArgs, DistillArgs, LmArgs, LossOnArg, PretrainArgs, TrainArgs};

impl AdamArgs {
    pub fn optim(&self, steps: usize, lr: f64, warmup: usize) -> Result<OptimConfig> {
        if steps == 0 || self.grad_accum == 0 {
            bail!("--steps and --grad-accum must be positive");
        }
        if !(lr > 0.0 && lr.is_finite()) {
            bail!("--lr must be a positive number, got {lr}");
        }
        Ok(OptimConfig {
            steps,
            lr,
            warmup,
            min_lr_ratio: self.min_lr_ratio,
            weight_decay: self.weight_decay,
            beta1: self.beta1,
            beta2: self.beta2,
            clip: self.clip,
            accumulation: self.grad_accum,
        })
    }
}

impl TrainArgs {
    pub fn optim(&self) -> Result<OptimConfig> {
        if self.batch_size == 0 {
            bail!("--batch-size must be positive");
        }
        posttrain_train::dist::world().check_divisible("--batch-size", self.batch_size)?;
        self.adam.optim(self.steps, self.lr, self.warmup)
    }

    /// The loop's configuration without on-policy batches.
    pub fn sft_config(&self, distill: Distill, kd: &DistillArgs, lm: &LmArgs) -> Result<SftConfig> {
        if !(0.0..=1.0).contains(&kd.alpha) {
            bail!("--alpha must be in [0, 1], got {}", kd.alpha);
        }
        if kd.temperature.is_nan() || kd.temperature <= 0.0 {
            bail!("--temperature must be positive, got {}", kd.temperature);
        }
        Ok(SftConfig {
            optim: self.optim()?,
            batch_size: self.batch_size,
            eval_every: self.eval_every,
            seed: self.seed,
            distill,
            alpha: if distill == Distill::None {
                0.0
            } else {
                kd.alpha
            },
            temperature: kd.temperature,
            on_policy: None,
            eval_samples: lm.eval_samples,
            eval_max_new_tokens: lm.eval_max_new_tokens,
        })
    }
}

pub fn run(args: PretrainArgs, env: &Env) -> Result<()> {
    if args.train.memory.lora.lora_rank.is_some() {
        bail!(
            "--lora-rank needs a checkpoint to adapt: use it with sft, reward --init, dpo, orpo or rlhf"
        );
    }
    let distill = match args.teacher {
        Some(_) => Distill::Live,
        None => Distill::None,
    };
    let cfg = args.train.sft_config(distill, &args.distill, &args.lm)?;
    let t = Training::begin("pretrain", env, &args.output, &args.train)?;
    let config = &Gemma2Config::from_file(&args.config)?;
    let tokenizer = &ChatTokenizer::from_file(&args.tokenizer)?;
    super::check_tokenizer_fits(tokenizer, &args.tokenizer, config, &args.config)?;
    let loss_on = match args.loss_on {
        LossOnArg::Completion => LossOn::Completion,
        LossOnArg::All => LossOn::All,
    };
    let (max_len, truncate) = (config.max_position_embeddings, args.lm.truncate);
    let (data, eval) = (&args.data, args.eval.as_deref());
    let data = super::TrainData::load(tokenizer, data, eval, max_len, truncate, loss_on, false)?;
    let dtype = args.frozen.weights_dtype;
    let load = |dir| super::load_teacher(dir, config, tokenizer, &t.device, dtype);
    let teacher = args.teacher.as_deref().map(load).transpose()?;
    let device = super::train_device(&t.device, args.train.memory.checkpoint_activations);
    let model = Gemma2ForCausalLM::new(config, &mut RandomInit::new(args.train.seed), &device)?;
    eprintln!("pretrain: {}", describe(config, &data, &cfg));
    let vocab = super::vocab(config, tokenizer);
    let settings = json!({"train": cfg, "config": args.config, "data": args.data, "eval": args.eval,
        "teacher": args.teacher, "tokenizer": args.tokenizer});
    let train = super::lm_loop("pretrain", teacher.as_ref(), &data, &vocab, &cfg);
    let (model, report, state) = t.run(settings, config, model, train)?;
    let loss_on = format!("{:?}", args.loss_on).to_lowercase();
    let settings = json!({"train": cfg, "loss_on": loss_on, "config": config});
    let provenance = Provenance::new("pretrain", t.backend, settings)
        .with_parent(&args.data)?
        .with_parent(&args.tokenizer)?;
    let parents = [args.eval.as_deref(), args.teacher.as_deref()];
    let metrics = serde_json::to_value(&report)?;
    let tables = (config, tokenizer);
    let out = t.finish(
        &model,
        tables,
        provenance,
        &args.config,
        &parents,
        metrics,
        state,
    )?;
    super::print_report("pretrain", &report, &out);
    Ok(())
}

/// The first line: the run's size and whether it distills.
fn describe(config: &Gemma2Config, data: &super::TrainData, cfg: &SftConfig) -> String {
    let distilling = if cfg.distill == Distill::Live {
        ", distilling from the teacher"
    } else {
        ""
    };
    format!(
        "{} params, {} train / {} eval sequences, {} steps of {}{distilling}",
        config.num_params(),
        data.train.len(),
        data.eval.examples.len(),
        cfg.optim.steps,
        cfg.batch_size,
    )
}
