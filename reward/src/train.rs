//! The reward model's training loop: pairs in seeded, length-bucketed
//! batches; chosen and rejected rows go through the model as one batch of
//! 2·B sequences; Bradley-Terry loss; AdamW with the shared schedule,
//! clipping and accumulation; held-out pairwise accuracy and reward-gap
//! statistics every `eval_every` steps.

use std::time::Instant;

use posttrain_datasets::Epochs;
use posttrain_model::{Gemma2ForSequenceClassification, Padding, TokenBatch};
use posttrain_train::{MetricsLog, OptimConfig, Optimizer, Progress, Resume, Saver};
use serde_json::json;

use crate::bradley_terry::{PairStats, bradley_terry_loss};
use crate::score::score_examples;

/// Token ids of a prompt with its chosen and its rejected completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairIds {
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RewardConfig {
    pub optim: OptimConfig,
    /// Pairs per micro-batch.
    pub batch_size: usize,
    pub eval_every: usize,
    pub seed: u64,
    /// m in −log σ(r⁺ − r⁻ − m).
    pub margin: f64,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RewardReport {
    pub first_loss: f64,
    pub last_loss: f64,
    pub eval: Option<PairStats>,
    pub pairs_seen: u64,
    pub seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum RewardError {
    #[error("loss is not finite ({loss}) at step {step}: lower --lr or check the data")]
    NotFinite { step: usize, loss: f64 },
    #[error("writing metrics: {0}")]
    Io(#[from] std::io::Error),
    #[error("no training pairs")]
    NoData,
    #[error("resumable state: {0}")]
    State(String),
}

/// Scores every pair (no gradients).
pub fn evaluate(
    model: &Gemma2ForSequenceClassification,
    pairs: &[PairIds],
    pad: u32,
    batch_size: usize,
    margin: f64,
) -> PairStats {
    let chosen: Vec<Vec<u32>> = pairs.iter().map(|p| p.chosen.clone()).collect();
    let rejected: Vec<Vec<u32>> = pairs.iter().map(|p| p.rejected.clone()).collect();
    let rc = score_examples(model, &chosen, pad, Padding::Right, batch_size);
    let rr = score_examples(model, &rejected, pad, Padding::Right, batch_size);
    PairStats::new(&rc, &rr, margin)
}

/// Trains `model`; with `resume` it continues a saved run (the model is the
/// saved one), and `saver` stores the state every N steps.
#[allow(clippy::too_many_arguments)]
pub fn train_reward(
    mut model: Gemma2ForSequenceClassification,
    train: &[PairIds],
    eval: &[PairIds],
    pad: u32,
    cfg: &RewardConfig,
    log: &mut MetricsLog,
    resume: Option<&Resume>,
    mut saver: Option<Saver<Gemma2ForSequenceClassification>>,
) -> Result<(Gemma2ForSequenceClassification, RewardReport), RewardError> {
    if train.is_empty() {
        return Err(RewardError::NoData);
    }
    let mut optim = Optimizer::new(&cfg.optim);
    let lengths = train
        .iter()
        .map(|p| p.chosen.len().max(p.rejected.len()))
        .collect();
    let mut data = Epochs::new(lengths, cfg.batch_size, cfg.seed);
    let mut progress = Progress::new("reward", cfg.optim.steps as u64, "steps");
    let start = Instant::now();
    let mut report = RewardReport {
        first_loss: f64::NAN,
        last_loss: f64::NAN,
        eval: None,
        pairs_seen: 0,
        seconds: 0.0,
    };
    let micro_batches = cfg.optim.accumulation.max(1);
    let mut first_step = 0;
    if let Some(r) = resume {
        report = r.restore(&mut optim).map_err(RewardError::State)?;
        data.seek(r.state.epoch, r.state.next);
        first_step = r.state.step;
        progress.advance(first_step as u64, 0);
    }

    for step in first_step..cfg.optim.steps {
        let (mut loss_sum, mut right, mut pairs, mut tokens) = (0.0, 0usize, 0usize, 0u64);
        for _ in 0..micro_batches {
            let idx = data.next_batch();
            let b = idx.len();
            let rows: Vec<Vec<u32>> = idx
                .iter()
                .map(|&i| train[i].chosen.clone())
                .chain(idx.iter().map(|&i| train[i].rejected.clone()))
                .collect();
            let batch = TokenBatch::new(&rows, pad, Padding::Right);
            tokens += batch.valid.iter().filter(|&&v| v).count() as u64;
            let r = model.forward(&batch);
            let (chosen, rejected) = (r.clone().narrow(0, 0, b), r.narrow(0, b, b));
            let gaps = (chosen.clone() - rejected.clone())
                .into_data()
                .try_into_vec_as::<f32>()
                .expect("f32");
            right += gaps.iter().filter(|&&g| g > 0.0).count();
            pairs += b;
            let loss = bradley_terry_loss(chosen, rejected, cfg.margin);
            let value = loss.clone().into_scalar::<f64>();
            if !value.is_finite() {
                return Err(RewardError::NotFinite {
                    step: step + 1,
                    loss: value,
                });
            }
            loss_sum += value;
            optim.backward(&model, loss);
        }
        let (next, stats) = optim.step(step, model);
        model = next;
        let loss = loss_sum / micro_batches as f64;
        if step == 0 {
            report.first_loss = loss;
        }
        report.last_loss = loss;
        report.pairs_seen += pairs as u64;
        let mut row = json!({
            "step": step + 1,
            "loss": loss,
            "accuracy": right as f64 / pairs.max(1) as f64,
            "lr": stats.lr,
            "grad_norm": stats.grad_norm,
            "pairs": report.pairs_seen,
            "epoch": data.epoch,
        });
        let due = (step + 1) % cfg.eval_every.max(1) == 0 || step + 1 == cfg.optim.steps;
        if cfg.eval_every > 0 && due && !eval.is_empty() {
            let s = evaluate(&model, eval, pad, 2 * cfg.batch_size, cfg.margin);
            row["eval_loss"] = s.loss.into();
            row["eval_accuracy"] = s.accuracy.into();
            row["eval_mean_gap"] = s.mean_gap.into();
            row["eval_std_gap"] = s.std_gap.into();
            progress.println(&format!(
                "reward: step {}: eval accuracy {:.3}, loss {:.4}, gap {:.3} ± {:.3}",
                step + 1,
                s.accuracy,
                s.loss,
                s.mean_gap,
                s.std_gap
            ));
            report.eval = Some(s);
        }
        log.log(&row)?;
        progress.advance(1, tokens);
        if let Some(s) = saver.as_mut() {
            let position = (data.epoch, data.next);
            s.after_step(
                step + 1,
                cfg.optim.steps,
                position,
                &report,
                &model,
                &optim,
                &[],
            )
            .map_err(RewardError::State)?;
        }
    }
    progress.finish();
    report.seconds = start.elapsed().as_secs_f64();
    Ok((model, report))
}
