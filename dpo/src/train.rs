//! DPO/IPO in the shared training loop: preference pairs in seeded,
//! length-bucketed batches, chosen and rejected completions through the
//! policy as one batch of 2·B sequences, the reference's completion
//! log-probs computed once for every pair before the first step.

use std::path::Path;

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use posttrain_datasets::{ChatTokenizer, DataError, Epochs, Example, Preference};
use posttrain_model::Gemma2ForCausalLM;
use posttrain_train::logprobs::{batch_of, logprob_sums, sequence_logprobs};
use posttrain_train::{
    Backward, LoopError, LoopState, LossSummary, MetricsLog, OptimConfig, Report, Resume, Saver,
    Schedule, Stage, StepLog, StepStats, train as train_loop,
};
use serde_json::json;

use crate::dpo::{DpoLoss, margins, preference_loss};

/// A prompt with its chosen and rejected completion, each an example whose
/// targets are the completion and its `<end_of_turn>`.
#[derive(Debug, Clone)]
pub struct PairExamples {
    pub chosen: Example,
    pub rejected: Example,
}

/// Renders preference rows read from `path`; a row longer than `max_len`
/// tokens is named and refused.
pub fn encode_preferences(
    tokenizer: &ChatTokenizer,
    rows: &[Preference],
    max_len: usize,
    path: &Path,
) -> Result<Vec<PairExamples>, DataError> {
    rows.iter()
        .enumerate()
        .map(|(i, p)| {
            let err = |reason: String| DataError::Row {
                path: path.to_path_buf(),
                row: i + 1,
                reason,
            };
            let messages = p.prompt.messages();
            let side = |text: &str| -> Result<Example, DataError> {
                let e = tokenizer
                    .render_example(&messages, text)
                    .map_err(|e| err(e.to_string()))?;
                if e.ids.len() > max_len {
                    return Err(err(format!(
                        "{} tokens exceed the model's context of {max_len}",
                        e.ids.len()
                    )));
                }
                Ok(e)
            };
            Ok(PairExamples {
                chosen: side(&p.chosen)?,
                rejected: side(&p.rejected)?,
            })
        })
        .collect()
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DpoConfig {
    pub optim: OptimConfig,
    /// Pairs per micro-batch.
    pub batch_size: usize,
    pub eval_every: usize,
    pub seed: u64,
    pub beta: f64,
    pub loss: DpoLoss,
    pub label_smoothing: f64,
}

/// Held-out preference statistics of the implicit rewards `β·(s − s_ref)`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PreferenceStats {
    pub loss: f64,
    /// Share of pairs whose chosen completion has the larger implicit reward.
    pub accuracy: f64,
    /// Mean margin h of the implicit rewards.
    pub margin: f64,
    pub pairs: usize,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DpoReport {
    #[serde(flatten)]
    pub loss: LossSummary,
    pub eval: Option<PreferenceStats>,
    pub pairs_seen: u64,
    pub seconds: f64,
}

impl Report for DpoReport {
    fn loss_summary(&mut self) -> &mut LossSummary {
        &mut self.loss
    }

    fn set_seconds(&mut self, seconds: f64) {
        self.seconds = seconds;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DpoError {
    #[error(transparent)]
    Loop(#[from] LoopError),
    #[error("no training pairs")]
    NoData,
    #[error("--beta must be positive, got {0}")]
    Beta(f64),
    #[error("--label-smoothing must be in [0, 0.5), got {0}")]
    LabelSmoothing(f64),
}

impl DpoConfig {
    /// Refuses settings that cannot run (named by their flags).
    pub fn check(&self) -> Result<(), DpoError> {
        if !(self.beta > 0.0 && self.beta.is_finite()) {
            return Err(DpoError::Beta(self.beta));
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return Err(DpoError::LabelSmoothing(self.label_smoothing));
        }
        Ok(())
    }
}

/// Completion log-prob sums of every pair's chosen and rejected side under
/// `model`, without gradients.
pub fn pair_logprobs(
    model: &Gemma2ForCausalLM,
    pairs: &[PairExamples],
    pad: u32,
    batch_size: usize,
) -> (Vec<f64>, Vec<f64>) {
    let model = model.valid();
    let chosen: Vec<Example> = pairs.iter().map(|p| p.chosen.clone()).collect();
    let rejected: Vec<Example> = pairs.iter().map(|p| p.rejected.clone()).collect();
    (
        logprob_sums(&model, &chosen, pad, batch_size),
        logprob_sums(&model, &rejected, pad, batch_size),
    )
}

fn tensor(v: &[f64], device: &Device) -> Tensor<1> {
    let n = v.len();
    let v: Vec<f32> = v.iter().map(|&x| x as f32).collect();
    Tensor::from_data(TensorData::new(v, [n]), device)
}

/// The preference loss, accuracy and mean margin of `pairs` under `model`
/// against cached reference sums (no gradients).
pub fn evaluate(
    model: &Gemma2ForCausalLM,
    pairs: &[PairExamples],
    reference: &(Vec<f64>, Vec<f64>),
    pad: u32,
    cfg: &DpoConfig,
) -> PreferenceStats {
    let (c, r) = pair_logprobs(model, pairs, pad, 2 * cfg.batch_size);
    let device = Device::default();
    let h = margins(
        tensor(&c, &device),
        tensor(&r, &device),
        tensor(&reference.0, &device),
        tensor(&reference.1, &device),
        cfg.beta,
    );
    let hs = h.clone().into_data().try_into_vec_as::<f64>().expect("f64");
    let loss = preference_loss(h, cfg.loss, cfg.beta, cfg.label_smoothing).into_scalar::<f64>();
    let n = hs.len().max(1) as f64;
    PreferenceStats {
        loss,
        accuracy: hs.iter().filter(|&&x| x > 0.0).count() as f64 / n,
        margin: hs.iter().sum::<f64>() / n,
        pairs: hs.len(),
    }
}

/// DPO in the shared loop.
struct DpoStage<'a> {
    train: &'a [PairExamples],
    eval: &'a [PairExamples],
    /// Reference sums of the train and eval pairs (chosen, rejected).
    reference: (Vec<f64>, Vec<f64>),
    eval_reference: (Vec<f64>, Vec<f64>),
    pad: u32,
    cfg: &'a DpoConfig,
    device: Device,
    data: Epochs,
    report: DpoReport,
    /// The current step's margins.
    margins: Vec<f64>,
}

impl Stage<Gemma2ForCausalLM> for DpoStage<'_> {
    type Report = DpoReport;
    type Error = DpoError;

    fn name(&self) -> &str {
        "dpo"
    }

    fn report(&mut self) -> &mut DpoReport {
        &mut self.report
    }

    fn restore(&mut self, report: DpoReport, state: &LoopState) -> Result<(), DpoError> {
        self.report = report;
        self.data.seek(state.epoch, state.next);
        Ok(())
    }

    fn forward_backward(
        &mut self,
        _step: usize,
        model: &Gemma2ForCausalLM,
        backward: &mut Backward<'_, Gemma2ForCausalLM>,
    ) -> Result<u64, DpoError> {
        let cfg = self.cfg;
        let (mut tokens, mut margins) = (0u64, Vec::new());
        let world = posttrain_train::dist::world();
        for _ in 0..cfg.optim.accumulation.max(1) {
            // this rank's share of the micro-batch (all of it in one process)
            let all = self.data.next_batch();
            let idx = &all[world.share(all.len())];
            let b = idx.len();
            if b == 0 {
                backward.empty_share()?;
                continue;
            }
            let rows: Vec<Example> = idx
                .iter()
                .map(|&i| self.train[i].chosen.clone())
                .chain(idx.iter().map(|&i| self.train[i].rejected.clone()))
                .collect();
            let (batch, weights) = batch_of(&rows, self.pad, &self.device);
            tokens += batch.valid.iter().filter(|&&v| v).count() as u64;
            let sums = sequence_logprobs(model, &batch, weights, false).sums;
            let pick = |v: &[f64]| -> Vec<f64> { idx.iter().map(|&i| v[i]).collect() };
            let h = margins_of(
                sums,
                b,
                &pick(&self.reference.0),
                &pick(&self.reference.1),
                cfg,
            );
            margins.extend(
                h.clone()
                    .inner()
                    .into_data()
                    .try_into_vec_as::<f64>()
                    .expect("f64"),
            );
            let loss = preference_loss(h, cfg.loss, cfg.beta, cfg.label_smoothing);
            backward.backward_share(model, loss, b as f64)?;
        }
        self.margins = world.all_gather_f64(&margins);
        let mut tokens = [tokens as f64];
        world.sum_f64(&mut tokens);
        Ok(tokens[0] as u64)
    }

    fn metrics(&mut self, step: usize, loss: f64, stats: &StepStats) -> Result<StepLog, DpoError> {
        let n = self.margins.len();
        self.report.pairs_seen += n as u64;
        let row = json!({
            "step": step + 1,
            "loss": loss,
            "reward_accuracy": self.margins.iter().filter(|&&h| h > 0.0).count() as f64 / n.max(1) as f64,
            "reward_margin": self.margins.iter().sum::<f64>() / n.max(1) as f64,
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
        model: &Gemma2ForCausalLM,
        row: &mut serde_json::Map<String, serde_json::Value>,
    ) -> Result<Option<String>, DpoError> {
        if self.eval.is_empty() {
            return Ok(None);
        }
        let s = evaluate(model, self.eval, &self.eval_reference, self.pad, self.cfg);
        row.insert("eval_loss".into(), s.loss.into());
        row.insert("eval_reward_accuracy".into(), s.accuracy.into());
        row.insert("eval_reward_margin".into(), s.margin.into());
        self.report.eval = Some(s);
        Ok(Some(format!(
            "dpo: step {}: eval loss {:.4}, reward accuracy {:.3}, margin {:.3}",
            step + 1,
            s.loss,
            s.accuracy,
            s.margin
        )))
    }

    fn position(&self) -> (u64, usize) {
        (self.data.epoch, self.data.next)
    }
}

/// `h` of a batch whose first `b` sums are the chosen sides.
fn margins_of(
    sums: Tensor<1>,
    b: usize,
    ref_chosen: &[f64],
    ref_rejected: &[f64],
    cfg: &DpoConfig,
) -> Tensor<1> {
    let device = sums.device();
    let (chosen, rejected) = (sums.clone().narrow(0, 0, b), sums.narrow(0, b, b));
    margins(
        chosen,
        rejected,
        tensor(ref_chosen, &device),
        tensor(ref_rejected, &device),
        cfg.beta,
    )
}

/// Trains `model` against `reference` (frozen; its log-probs are computed
/// once); with `resume` it continues a saved run (the model is the saved
/// one), and `saver` stores the state every N steps.
#[allow(clippy::too_many_arguments)]
pub fn train_dpo(
    model: Gemma2ForCausalLM,
    reference: &Gemma2ForCausalLM,
    (train, eval): (&[PairExamples], &[PairExamples]),
    pad: u32,
    cfg: &DpoConfig,
    log: &mut MetricsLog,
    resume: Option<&Resume>,
    saver: Option<Saver<Gemma2ForCausalLM>>,
) -> Result<(Gemma2ForCausalLM, DpoReport), DpoError> {
    cfg.check()?;
    if train.is_empty() {
        return Err(DpoError::NoData);
    }
    let lengths = train
        .iter()
        .map(|p| p.chosen.ids.len().max(p.rejected.ids.len()))
        .collect();
    let mut stage = DpoStage {
        train,
        eval,
        reference: pair_logprobs(reference, train, pad, 2 * cfg.batch_size),
        eval_reference: pair_logprobs(reference, eval, pad, 2 * cfg.batch_size),
        pad,
        cfg,
        device: model.model.embed_tokens.weight.device(),
        data: Epochs::new(lengths, cfg.batch_size, cfg.seed),
        report: DpoReport {
            loss: LossSummary::default(),
            eval: None,
            pairs_seen: 0,
            seconds: 0.0,
        },
        margins: Vec::new(),
    };
    let schedule = Schedule {
        optim: &cfg.optim,
        eval_every: cfg.eval_every,
        seed: cfg.seed,
    };
    let model = train_loop(&mut stage, model, schedule, log, resume, saver)?;
    Ok((model, stage.report))
}
