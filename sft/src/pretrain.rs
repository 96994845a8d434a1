//! The training loop of `pretrain` (and, later, `sft`): one flat loop that
//! reads top to bottom. Batches come length-bucketed in a seeded order; the
//! loss is cross-entropy on the target tokens, or with a teacher the
//! distillation loss of `distill.rs`; AdamW with warmup + cosine and
//! global-norm clipping; eval loss every `eval_every` steps.

use std::time::Instant;

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Tensor, TensorData};
use posttrain_datasets::{Example, bucketed_batches};
use posttrain_model::{Gemma2ForCausalLM, Padding, TokenBatch};
use posttrain_train::{MetricsLog, Progress, clip_global_norm, warmup_cosine};
use serde_json::json;

use crate::distill::distillation_loss;

#[derive(Debug, Clone, serde::Serialize)]
pub struct PretrainConfig {
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub warmup: usize,
    pub min_lr_ratio: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub clip: f64,
    pub eval_every: usize,
    pub seed: u64,
    /// Weight of the distillation term (used with a teacher).
    pub alpha: f64,
    pub temperature: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PretrainReport {
    pub first_loss: f64,
    pub last_loss: f64,
    pub eval_loss: Option<f64>,
    pub tokens: u64,
    pub seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum PretrainError {
    #[error("loss is not finite ({loss}) at step {step}: lower --lr or check the data")]
    NotFinite { step: usize, loss: f64 },
    #[error("writing metrics: {0}")]
    Io(#[from] std::io::Error),
    #[error("no training examples")]
    NoData,
}

/// A right-padded batch and its target weights `[batch, len − 1]`.
pub fn make_batch(examples: &[&Example], pad: u32, device: &Device) -> (TokenBatch, Tensor<2>) {
    let rows: Vec<Vec<u32>> = examples.iter().map(|e| e.ids.clone()).collect();
    let batch = TokenBatch::new(&rows, pad, Padding::Right);
    let len = batch.len;
    let mut w = Vec::with_capacity(batch.batch * (len - 1));
    for e in examples {
        for t in 1..len {
            w.push(if e.target.get(t).copied().unwrap_or(false) {
                1.0f32
            } else {
                0.0
            });
        }
    }
    let weights = Tensor::from_data(TensorData::new(w, [batch.batch, len - 1]), device);
    (batch, weights)
}

/// Mean cross-entropy over the target tokens of `examples` (no gradients).
pub fn eval_loss(
    model: &Gemma2ForCausalLM,
    examples: &[Example],
    pad: u32,
    batch_size: usize,
) -> f64 {
    let model = model.valid();
    let device = model.model.embed_tokens.weight.device();
    let (mut total, mut count) = (0.0, 0.0);
    let refs: Vec<&Example> = examples.iter().collect();
    for chunk in refs.chunks(batch_size.max(1)) {
        let (batch, weights) = make_batch(chunk, pad, &device);
        let n = weights.clone().sum().into_scalar::<f64>();
        let logits = model.forward(&batch);
        let ce = distillation_loss(logits, None, &batch, weights, 0.0, 1.0).ce;
        total += ce.into_scalar::<f64>() * n;
        count += n;
    }
    total / count.max(1.0)
}

pub fn pretrain(
    mut model: Gemma2ForCausalLM,
    teacher: Option<&Gemma2ForCausalLM>,
    train: &[Example],
    eval: &[Example],
    pad: u32,
    cfg: &PretrainConfig,
    log: &mut MetricsLog,
) -> Result<(Gemma2ForCausalLM, PretrainReport), PretrainError> {
    if train.is_empty() {
        return Err(PretrainError::NoData);
    }
    let device = model.model.embed_tokens.weight.device();
    let teacher = teacher.map(Module::valid);
    let mut optim = AdamWConfig::new()
        .with_beta_1(cfg.beta1 as f32)
        .with_beta_2(cfg.beta2 as f32)
        .with_epsilon(1e-8)
        .with_weight_decay(cfg.weight_decay as f32)
        .init();
    let lengths: Vec<usize> = train.iter().map(|e| e.ids.len()).collect();
    let mut epoch = 0u64;
    let mut order = bucketed_batches(&lengths, cfg.batch_size, cfg.seed);
    let mut next = 0;
    let mut progress = Progress::new("pretrain", cfg.steps as u64, "steps");
    let start = Instant::now();
    let (mut first_loss, mut last_loss, mut last_eval) = (f64::NAN, f64::NAN, None);
    let mut tokens = 0u64;

    for step in 0..cfg.steps {
        if next == order.len() {
            epoch += 1;
            order = bucketed_batches(&lengths, cfg.batch_size, cfg.seed.wrapping_add(epoch));
            next = 0;
        }
        let examples: Vec<&Example> = order[next].iter().map(|&i| &train[i]).collect();
        next += 1;
        let (batch, weights) = make_batch(&examples, pad, &device);
        let batch_tokens = batch.valid.iter().filter(|&&v| v).count() as u64;

        let teacher_logits = teacher.as_ref().map(|t| t.forward(&batch).autodiff());
        let logits = model.forward(&batch);
        let parts = distillation_loss(
            logits,
            teacher_logits,
            &batch,
            weights,
            cfg.alpha,
            cfg.temperature,
        );
        let mut grads = GradientsParams::from_grads(parts.loss.backward(), &model);
        let grad_norm = clip_global_norm(&model, &mut grads, cfg.clip);
        let lr = warmup_cosine(step, cfg.steps, cfg.warmup, cfg.lr, cfg.min_lr_ratio);
        model = optim.step(lr, model, grads);

        let loss = parts.loss.into_scalar::<f64>();
        if !loss.is_finite() {
            return Err(PretrainError::NotFinite { step, loss });
        }
        if step == 0 {
            first_loss = loss;
        }
        last_loss = loss;
        tokens += batch_tokens;
        let due = (step + 1) % cfg.eval_every.max(1) == 0 || step + 1 == cfg.steps;
        let eval_now = (cfg.eval_every > 0 && !eval.is_empty() && due)
            .then(|| eval_loss(&model, eval, pad, cfg.batch_size));
        let mut row = json!({
            "step": step + 1,
            "loss": loss,
            "ce": parts.ce.into_scalar::<f64>(),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": tokens,
            "tokens_per_s": tokens as f64 / start.elapsed().as_secs_f64(),
            "epoch": epoch,
        });
        if let Some(kl) = parts.kl {
            row["kl"] = kl.into_scalar::<f64>().into();
        }
        if let Some(e) = eval_now {
            row["eval_loss"] = e.into();
            last_eval = Some(e);
            eprintln!("pretrain: step {}: eval loss {e:.4}", step + 1);
        }
        log.log(&row)?;
        progress.advance(1, batch_tokens);
    }
    progress.finish();
    Ok((
        model,
        PretrainReport {
            first_loss,
            last_loss,
            eval_loss: last_eval,
            tokens,
            seconds: start.elapsed().as_secs_f64(),
        },
    ))
}
