//! DPO/IPO in the shared training loop: preference pairs in seeded,
//! length-bucketed batches, chosen and rejected completions through the
//! policy as one batch of 2·B sequences, the reference's completion
//! log-probs computed once for every pair before the first step.

use std::path::Path;

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use posttrain_datasets::{ChatTokenizer, DataError, Example, Preference};
use posttrain_model::Gemma2ForCausalLM;
use posttrain_model::params::device_of;
use posttrain_train::logprobs::{batch_of, sequence_logprobs, shared_prompt_logprobs};
use posttrain_train::{
    At, LoopError, MetricsLog, OptimConfig, Resume, Run, Saver, Schedule, Share, Stage, Step,
    StepLog, train as train_loop,
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

/// Each pair's longer side, in tokens (its length in length-bucketed batches).
pub fn pair_lengths(pairs: &[PairExamples]) -> Vec<usize> {
    pairs
        .iter()
        .map(|p| p.chosen.ids.len().max(p.rejected.ids.len()))
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

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct DpoReport {
    pub eval: Option<PreferenceStats>,
    pub pairs_seen: u64,
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
/// `model`, without gradients; the two sides of a pair share one pass over
/// their prompt.
pub fn pair_logprobs(
    model: &Gemma2ForCausalLM,
    pairs: &[PairExamples],
    pad: u32,
    batch_size: usize,
) -> (Vec<f64>, Vec<f64>) {
    let model = model.valid();
    let sides: Vec<Example> = pairs
        .iter()
        .flat_map(|p| [p.chosen.clone(), p.rejected.clone()])
        .collect();
    let (sums, _) = shared_prompt_logprobs(&model, &sides, pad, 2 * batch_size.max(1), false);
    sums.chunks(2).map(|s| (s[0], s[1])).unzip()
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
    let device = device_of(model);
    let h = margins(
        tensor(&c, &device),
        tensor(&r, &device),
        tensor(&reference.0, &device),
        tensor(&reference.1, &device),
        cfg.beta,
    );
    let hs = h.clone().into_data().try_into_vec_as::<f64>().expect("f64");
    let loss = preference_loss(h, cfg.loss, cfg.beta, cfg.label_smoothing).into_scalar::<f64>();
    PreferenceStats::of(loss, &hs)
}

/// The chosen sides of `rows` then their rejected sides: one batch of 2·B.
pub fn both_sides(pairs: &[PairExamples], rows: &[usize]) -> Vec<Example> {
    let side = |f: fn(&PairExamples) -> &Example| rows.iter().map(move |&i| f(&pairs[i]).clone());
    side(|p| &p.chosen).chain(side(|p| &p.rejected)).collect()
}

/// A preference stage's metrics row from its pairs' implicit-reward margins.
pub fn preference_row(s: &Step<'_>, margins: &[f64], report: &mut Run<DpoReport>) -> StepLog {
    let n = margins.len().max(1) as f64;
    report.pairs_seen += margins.len() as u64;
    StepLog::of(json!({
        "step": s.step + 1,
        "loss": s.loss,
        "reward_accuracy": margins.iter().filter(|&&h| h > 0.0).count() as f64 / n,
        "reward_margin": margins.iter().sum::<f64>() / n,
        "lr": s.optim.lr,
        "grad_norm": s.optim.grad_norm,
        "pairs": report.pairs_seen,
        "epoch": s.epoch,
    }))
}

impl PreferenceStats {
    /// Of held-out pairs' margins `h` and their mean loss.
    pub fn of(loss: f64, h: &[f64]) -> Self {
        let n = h.len().max(1) as f64;
        Self {
            loss,
            accuracy: h.iter().filter(|&&x| x > 0.0).count() as f64 / n,
            margin: h.iter().sum::<f64>() / n,
            pairs: h.len(),
        }
    }

    /// Records held-out statistics in the row and the report; the log line.
    pub fn record(
        self,
        (stage, step): (&str, usize),
        row: &mut serde_json::Map<String, serde_json::Value>,
        report: &mut DpoReport,
    ) -> String {
        row.insert("eval_loss".into(), self.loss.into());
        row.insert("eval_reward_accuracy".into(), self.accuracy.into());
        row.insert("eval_reward_margin".into(), self.margin.into());
        report.eval = Some(self);
        format!(
            "{stage}: step {}: eval loss {:.4}, reward accuracy {:.3}, margin {:.3}",
            step + 1,
            self.loss,
            self.accuracy,
            self.margin
        )
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
}

impl Stage<Gemma2ForCausalLM> for DpoStage<'_> {
    type Report = DpoReport;
    type Error = DpoError;
    const VALUES: &'static [&'static str] = &["margin"];

    fn name(&self) -> &str {
        "dpo"
    }

    fn loss(
        &mut self,
        _at: At,
        rows: &[usize],
        model: &Gemma2ForCausalLM,
    ) -> Result<Share, DpoError> {
        let (cfg, b) = (self.cfg, rows.len());
        let (batch, weights) = batch_of(&both_sides(self.train, rows), self.pad, &self.device);
        let tokens = batch.valid.iter().filter(|&&v| v).count() as u64;
        let sums = sequence_logprobs(model, &batch, weights, false).sums;
        let pick = |v: &[f64]| -> Vec<f64> { rows.iter().map(|&i| v[i]).collect() };
        let h = margins_of(
            sums,
            b,
            &pick(&self.reference.0),
            &pick(&self.reference.1),
            cfg,
        );
        let margins = h.clone().inner().into_data().try_into_vec_as::<f64>();
        let loss = preference_loss(h, cfg.loss, cfg.beta, cfg.label_smoothing);
        Ok(Share {
            values: vec![margins.expect("f64")],
            ..Share::new(loss, b as f64, tokens)
        })
    }

    fn metrics(&mut self, s: &Step<'_>, report: &mut Run<DpoReport>) -> Result<StepLog, DpoError> {
        Ok(preference_row(s, s.values("margin"), report))
    }

    fn evaluate(
        &mut self,
        step: usize,
        model: &Gemma2ForCausalLM,
        row: &mut serde_json::Map<String, serde_json::Value>,
        report: &mut DpoReport,
    ) -> Result<Option<String>, DpoError> {
        if self.eval.is_empty() {
            return Ok(None);
        }
        let s = evaluate(model, self.eval, &self.eval_reference, self.pad, self.cfg);
        Ok(Some(s.record(("dpo", step), row, report)))
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
) -> Result<(Gemma2ForCausalLM, Run<DpoReport>), DpoError> {
    cfg.check()?;
    if train.is_empty() {
        return Err(DpoError::NoData);
    }
    let mut stage = DpoStage {
        train,
        eval,
        reference: pair_logprobs(reference, train, pad, 2 * cfg.batch_size),
        eval_reference: pair_logprobs(reference, eval, pad, 2 * cfg.batch_size),
        pad,
        cfg,
        device: model.model.embed_tokens.weight.device(),
    };
    let data = (pair_lengths(train), cfg.batch_size);
    let schedule = Schedule::new(&cfg.optim, data, cfg.eval_every, cfg.seed);
    train_loop(&mut stage, model, schedule, log, resume, saver)
}
