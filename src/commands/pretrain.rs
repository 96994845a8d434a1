use anyhow::{Result, bail};
use posttrain_datasets::{ChatTokenizer, LossOn};
use posttrain_model::{CheckpointWriter, Gemma2Config, Gemma2ForCausalLM, Provenance, RandomInit};
use posttrain_sft::{Distill, SftConfig};
use posttrain_train::OptimConfig;
use posttrain_train::Vocab;
use serde_json::json;

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
    let (device, backend) = (env.device()?, env.backend());
    let distill = if args.teacher.is_some() {
        Distill::Live
    } else {
        Distill::None
    };
    if args.train.memory.lora.lora_rank.is_some() {
        bail!(
            "--lora-rank needs a checkpoint to adapt: use it with sft, reward --init, dpo or rlhf"
        );
    }
    let cfg = args.train.sft_config(distill, &args.distill, &args.lm)?;
    let writer = CheckpointWriter::create(&args.output.out, args.output.overwrite)?;
    let config = Gemma2Config::from_file(&args.config)?;
    let tokenizer = ChatTokenizer::from_file(&args.tokenizer)?;
    super::check_tokenizer_fits(&tokenizer, &args.tokenizer, &config, &args.config)?;
    let loss_on = match args.loss_on {
        LossOnArg::Completion => LossOn::Completion,
        LossOnArg::All => LossOn::All,
    };
    let data = super::TrainData::load(
        &tokenizer,
        &args.data,
        args.eval.as_deref(),
        config.max_position_embeddings,
        args.lm.truncate,
        loss_on,
        false,
    )?;
    let teacher = match &args.teacher {
        Some(dir) => Some(super::load_teacher(
            dir,
            &config,
            &tokenizer,
            &device,
            args.frozen.weights_dtype,
        )?),
        None => None,
    };
    let model = Gemma2ForCausalLM::new(
        &config,
        &mut RandomInit::new(args.train.seed),
        &super::train_device(&device, args.train.memory.checkpoint_activations),
    )?;
    eprintln!(
        "pretrain: {} params, {} train / {} eval sequences, {} steps of {}{}",
        config.num_params(),
        data.train.len(),
        data.eval.examples.len(),
        cfg.optim.steps,
        cfg.batch_size,
        if teacher.is_some() {
            ", distilling from the teacher"
        } else {
            ""
        }
    );
    let vocab = Vocab {
        tokenizer: &tokenizer,
        stop_ids: super::stop_ids(&config, &tokenizer),
        max_len: config.max_position_embeddings,
    };
    let (model, report, state) = super::train_resumable(
        "pretrain",
        model,
        teacher.as_ref(),
        &data,
        &vocab,
        &cfg,
        &args.train,
        &args.output.out,
        writer.path(),
        &config,
        json!({"train": cfg, "config": args.config, "data": args.data, "eval": args.eval, "teacher": args.teacher, "tokenizer": args.tokenizer}),
    )?;
    let provenance = Provenance::new(
        "pretrain",
        backend,
        json!({"train": cfg, "loss_on": format!("{:?}", args.loss_on).to_lowercase(), "config": config}),
    )
    .with_parent(&args.data)?
    .with_parent(&args.tokenizer)?;
    let out = super::finish_checkpoint(
        writer,
        &model,
        &config,
        &tokenizer,
        provenance,
        &[args.eval.as_deref(), args.teacher.as_deref()],
        Some(args.train.seed),
        serde_json::to_value(&report)?,
    )?;
    state.remove()?;
    super::print_report("pretrain", &report, &out);
    Ok(())
}
