//! The reward model's stage in the shared loop (`train::train`): pairs in
//! seeded, length-bucketed batches; chosen and rejected rows go through the
//! model as one batch of 2·B sequences; Bradley-Terry loss; held-out
//! pairwise accuracy and reward-gap statistics every `eval_every` steps.

use posttrain_model::{Gemma2ForSequenceClassification, Padding, TokenBatch};
use posttrain_train::{
    At, LoopError, MetricsLog, OptimConfig, Resume, Run, Saver, Schedule, Share, Stage, Step,
    StepLog, train as train_loop,
};
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

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RewardReport {
    pub eval: Option<PairStats>,
    pub pairs_seen: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RewardError {
    #[error(transparent)]
    Loop(#[from] LoopError),
    #[error("no training pairs")]
    NoData,
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

/// The reward model in the shared loop.
struct RewardStage<'a> {
    train: &'a [PairIds],
    eval: &'a [PairIds],
    pad: u32,
    cfg: &'a RewardConfig,
}

impl Stage<Gemma2ForSequenceClassification> for RewardStage<'_> {
    type Report = RewardReport;
    type Error = RewardError;
    const COUNTS: &'static [&'static str] = &["right", "pairs"];

    fn name(&self) -> &str {
        "reward"
    }

    fn loss(
        &mut self,
        _at: At,
        rows: &[usize],
        model: &Gemma2ForSequenceClassification,
    ) -> Result<Share, RewardError> {
        let b = rows.len();
        let ids: Vec<Vec<u32>> = rows
            .iter()
            .map(|&i| self.train[i].chosen.clone())
            .chain(rows.iter().map(|&i| self.train[i].rejected.clone()))
            .collect();
        let batch = TokenBatch::new(&ids, self.pad, Padding::Right);
        let tokens = batch.valid.iter().filter(|&&v| v).count() as u64;
        let r = model.forward(&batch);
        let (chosen, rejected) = (r.clone().narrow(0, 0, b), r.narrow(0, b, b));
        let gaps = (chosen.clone() - rejected.clone())
            .into_data()
            .try_into_vec_as::<f32>()
            .expect("f32");
        let right = gaps.iter().filter(|&&g| g > 0.0).count();
        let loss = bradley_terry_loss(chosen, rejected, self.cfg.margin);
        Ok(Share {
            counts: vec![right as f64, b as f64],
            ..Share::new(loss, b as f64, tokens)
        })
    }

    fn metrics(
        &mut self,
        s: &Step<'_>,
        report: &mut Run<RewardReport>,
    ) -> Result<StepLog, RewardError> {
        let pairs = s.count("pairs");
        report.pairs_seen += pairs as u64;
        let row = json!({
            "step": s.step + 1,
            "loss": s.loss,
            "accuracy": s.count("right") / pairs.max(1.0),
            "lr": s.optim.lr,
            "grad_norm": s.optim.grad_norm,
            "pairs": report.pairs_seen,
            "epoch": s.epoch,
        });
        Ok(StepLog::of(row))
    }

    fn evaluate(
        &mut self,
        step: usize,
        model: &Gemma2ForSequenceClassification,
        row: &mut serde_json::Map<String, serde_json::Value>,
        report: &mut RewardReport,
    ) -> Result<Option<String>, RewardError> {
        if self.eval.is_empty() {
            return Ok(None);
        }
        let cfg = self.cfg;
        let s = evaluate(model, self.eval, self.pad, 2 * cfg.batch_size, cfg.margin);
        row.insert("eval_loss".into(), s.loss.into());
        row.insert("eval_accuracy".into(), s.accuracy.into());
        row.insert("eval_mean_gap".into(), s.mean_gap.into());
        row.insert("eval_std_gap".into(), s.std_gap.into());
        let line = format!(
            "reward: step {}: eval accuracy {:.3}, loss {:.4}, gap {:.3} ± {:.3}",
            step + 1,
            s.accuracy,
            s.loss,
            s.mean_gap,
            s.std_gap
        );
        report.eval = Some(s);
        Ok(Some(line))
    }
}

/// Trains `model`; with `resume` it continues a saved run (the model is the
/// saved one), and `saver` stores the state every N steps.
pub fn train_reward(
    model: Gemma2ForSequenceClassification,
    (train, eval): (&[PairIds], &[PairIds]),
    pad: u32,
    cfg: &RewardConfig,
    log: &mut MetricsLog,
    resume: Option<&Resume>,
    saver: Option<Saver<Gemma2ForSequenceClassification>>,
) -> Result<(Gemma2ForSequenceClassification, Run<RewardReport>), RewardError> {
    if train.is_empty() {
        return Err(RewardError::NoData);
    }
    let lengths = train
        .iter()
        .map(|p| p.chosen.len().max(p.rejected.len()))
        .collect();
    let mut stage = RewardStage {
        train,
        eval,
        pad,
        cfg,
    };
    let schedule = Schedule::new(
        &cfg.optim,
        (lengths, cfg.batch_size),
        cfg.eval_every,
        cfg.seed,
    );
    train_loop(&mut stage, model, schedule, log, resume, saver)
}
