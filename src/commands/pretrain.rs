use anyhow::{Result, bail};
use burn::tensor::Device;
use posttrain_datasets::{
    ChatTokenizer, LossOn, Overflow, TrainRecord, encode_records, read_records,
};
use posttrain_model::checkpoint::TOKENIZER_FILE;
use posttrain_model::provenance::PROVENANCE_FILE;
use posttrain_model::{
    CheckpointWriter, Gemma2Config, Gemma2ForCausalLM, Provenance, RandomInit, SaveDtype,
    load_causal_lm,
};
use posttrain_sft::{PretrainConfig, pretrain};
use posttrain_train::MetricsLog;
use serde_json::json;

use crate::cli::{LossOnArg, PretrainArgs, TrainArgs};

impl TrainArgs {
    pub fn pretrain_config(&self, alpha: f64, temperature: f64) -> Result<PretrainConfig> {
        if self.steps == 0 || self.batch_size == 0 {
            bail!("--steps and --batch-size must be positive");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            bail!("--lr must be a positive number, got {}", self.lr);
        }
        if !(0.0..=1.0).contains(&alpha) {
            bail!("--alpha must be in [0, 1], got {alpha}");
        }
        if temperature.is_nan() || temperature <= 0.0 {
            bail!("--temperature must be positive, got {temperature}");
        }
        Ok(PretrainConfig {
            steps: self.steps,
            batch_size: self.batch_size,
            lr: self.lr,
            warmup: self.warmup,
            min_lr_ratio: self.min_lr_ratio,
            weight_decay: self.weight_decay,
            beta1: self.beta1,
            beta2: self.beta2,
            clip: self.clip,
            eval_every: self.eval_every,
            seed: self.seed,
            alpha,
            temperature,
        })
    }
}

pub fn run(args: PretrainArgs, device: Device, backend: &str) -> Result<()> {
    let has_teacher = args.teacher.is_some();
    let cfg = args
        .train
        .pretrain_config(if has_teacher { args.alpha } else { 0.0 }, args.temperature)?;
    let writer = CheckpointWriter::create(&args.out, args.overwrite)?;
    let config = Gemma2Config::from_file(&args.config)?;
    let tokenizer = ChatTokenizer::from_file(&args.tokenizer)?;
    if tokenizer.vocab_size() > config.vocab_size {
        bail!(
            "{}: tokenizer has {} tokens but {} sets vocab_size {}",
            args.tokenizer.display(),
            tokenizer.vocab_size(),
            args.config.display(),
            config.vocab_size
        );
    }
    let overflow = if args.train.truncate {
        Overflow::Truncate
    } else {
        Overflow::Error
    };
    let loss_on = match args.loss_on {
        LossOnArg::Completion => LossOn::Completion,
        LossOnArg::All => LossOn::All,
    };
    let max_len = config.max_position_embeddings;
    let load = |path: &std::path::Path| -> Result<_> {
        let records: Vec<TrainRecord> = read_records(path)?;
        Ok(encode_records(
            &tokenizer, &records, max_len, overflow, loss_on, path,
        )?)
    };
    let train = load(&args.data)?;
    let eval = match &args.eval {
        Some(p) => load(p)?,
        None => Vec::new(),
    };
    let train_device = device.clone().autodiff();
    let teacher = match &args.teacher {
        Some(dir) => {
            let (tc, t) = load_causal_lm(dir, &device)?;
            if tc.vocab_size != config.vocab_size {
                bail!(
                    "{}: teacher vocab_size {} differs from the student's {}",
                    dir.display(),
                    tc.vocab_size,
                    config.vocab_size
                );
            }
            Some(t)
        }
        None => None,
    };
    let model = Gemma2ForCausalLM::new(
        &config,
        &mut RandomInit::new(args.train.seed),
        &train_device,
    )?;
    let mut log = MetricsLog::create(&writer.path().join("metrics.jsonl"))?;
    eprintln!(
        "pretrain: {} params, {} train / {} eval sequences, {} steps of {}{}",
        config.num_params(),
        train.len(),
        eval.len(),
        cfg.steps,
        cfg.batch_size,
        if has_teacher {
            ", distilling from the teacher"
        } else {
            ""
        }
    );
    let (model, report) = pretrain(
        model,
        teacher.as_ref(),
        &train,
        &eval,
        tokenizer.pad,
        &cfg,
        &mut log,
    )?;
    writer.write_model(&model, &config, SaveDtype::F32)?;
    tokenizer.save(&writer.path().join(TOKENIZER_FILE))?;
    let mut provenance = Provenance::new(
        "pretrain",
        backend,
        json!({"train": cfg, "loss_on": format!("{:?}", args.loss_on).to_lowercase(), "config": config}),
    )
    .with_parent(&args.data)?
    .with_parent(&args.tokenizer)?;
    if let Some(e) = &args.eval {
        provenance = provenance.with_parent(e)?;
    }
    if let Some(t) = &args.teacher {
        provenance = provenance.with_parent(t)?;
    }
    provenance.seed = Some(args.train.seed);
    provenance.metrics = serde_json::to_value(&report)?;
    writer.write(PROVENANCE_FILE, provenance.to_json().as_bytes())?;
    let out = writer.commit()?;
    eprintln!(
        "pretrain: loss {:.4} -> {:.4}, eval loss {}, {:.0} tokens/s -> {}",
        report.first_loss,
        report.last_loss,
        report.eval_loss.map_or("-".into(), |e| format!("{e:.4}")),
        report.tokens as f64 / report.seconds,
        out.display()
    );
    Ok(())
}
