//! The reward model's training loop: pairs in seeded, length-bucketed
//! batches; chosen and rejected rows go through the model as one batch of
//! 2·B sequences; Bradley-Terry loss; AdamW with the shared schedule,
//! clipping and accumulation; held-out pairwise accuracy and reward-gap
//! statistics every `eval_every` steps.

use posttrain_datasets::Epochs;
use posttrain_model::{Gemma2ForSequenceClassification, Padding, TokenBatch};
use posttrain_train::{
    Backward, LoopError, LoopState, LossSummary, MetricsLog, OptimConfig, Report, Resume, Saver,
    Schedule, Stage, StepLog, StepStats, train as train_loop,
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

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RewardReport {
    #[serde(flatten)]
    pub loss: LossSummary,
    pub eval: Option<PairStats>,
    pub pairs_seen: u64,
    pub seconds: f64,
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
    data: Epochs,
    report: RewardReport,
    /// The current step's pairs ranked right and pairs seen.
    right: usize,
    pairs: usize,
}

impl Report for RewardReport {
    fn loss_summary(&mut self) -> &mut LossSummary {
        &mut self.loss
    }

    fn set_seconds(&mut self, seconds: f64) {
        self.seconds = seconds;
    }
}

impl Stage<Gemma2ForSequenceClassification> for RewardStage<'_> {
    type Report = RewardReport;
    type Error = RewardError;

    fn name(&self) -> &str {
        "reward"
    }

    fn report(&mut self) -> &mut RewardReport {
        &mut self.report
    }

    fn restore(&mut self, report: RewardReport, state: &LoopState) -> Result<(), RewardError> {
        self.report = report;
        self.data.seek(state.epoch, state.next);
        Ok(())
    }

    fn forward_backward(
        &mut self,
        _step: usize,
        model: &Gemma2ForSequenceClassification,
        backward: &mut Backward<'_, Gemma2ForSequenceClassification>,
    ) -> Result<u64, RewardError> {
        let (mut right, mut pairs, mut tokens) = (0usize, 0usize, 0u64);
        let world = posttrain_train::dist::world();
        for _ in 0..self.cfg.optim.accumulation.max(1) {
            // this rank's share of the micro-batch (all of it in one process)
            let all = self.data.next_batch();
            let idx = &all[world.share(all.len())];
            let b = idx.len();
            if b == 0 {
                backward.empty_share()?;
                continue;
            }
            let rows: Vec<Vec<u32>> = idx
                .iter()
                .map(|&i| self.train[i].chosen.clone())
                .chain(idx.iter().map(|&i| self.train[i].rejected.clone()))
                .collect();
            let batch = TokenBatch::new(&rows, self.pad, Padding::Right);
            tokens += batch.valid.iter().filter(|&&v| v).count() as u64;
            let r = model.forward(&batch);
            let (chosen, rejected) = (r.clone().narrow(0, 0, b), r.narrow(0, b, b));
            let gaps = (chosen.clone() - rejected.clone())
                .into_data()
                .try_into_vec_as::<f32>()
                .expect("f32");
            right += gaps.iter().filter(|&&g| g > 0.0).count();
            pairs += b;
            let loss = bradley_terry_loss(chosen, rejected, self.cfg.margin);
            backward.backward_share(model, loss, b as f64)?;
        }
        let mut counts = [right as f64, pairs as f64, tokens as f64];
        world.sum_f64(&mut counts);
        self.right = counts[0] as usize;
        self.pairs = counts[1] as usize;
        Ok(counts[2] as u64)
    }

    fn metrics(
        &mut self,
        step: usize,
        loss: f64,
        stats: &StepStats,
    ) -> Result<StepLog, RewardError> {
        self.report.pairs_seen += self.pairs as u64;
        let row = json!({
            "step": step + 1,
            "loss": loss,
            "accuracy": self.right as f64 / self.pairs.max(1) as f64,
            "lr": stats.lr,
            "grad_norm": stats.grad_norm,
            "pairs": self.report.pairs_seen,
            "epoch": self.data.epoch,
        });
        Ok(StepLog::of(row))
    }

    fn evaluate(
        &mut self,
        step: usize,
        model: &Gemma2ForSequenceClassification,
        row: &mut serde_json::Map<String, serde_json::Value>,
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
        self.report.eval = Some(s);
        Ok(Some(line))
    }

    fn position(&self) -> (u64, usize) {
        (self.data.epoch, self.data.next)
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
) -> Result<(Gemma2ForSequenceClassification, RewardReport), RewardError> {
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
        data: Epochs::new(lengths, cfg.batch_size, cfg.seed),
        report: RewardReport {
            loss: LossSummary::default(),
            eval: None,
            pairs_seen: 0,
            seconds: 0.0,
        },
        right: 0,
        pairs: 0,
    };
    let schedule = Schedule {
        optim: &cfg.optim,
        eval_every: cfg.eval_every,
        seed: cfg.seed,
    };
    let model = train_loop(&mut stage, model, schedule, log, resume, saver)?;
    Ok((model, stage.report))
}
