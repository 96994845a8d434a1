//! Odds-ratio preference optimisation (ORPO, Hong et al. 2024, arXiv 2403.07691): supervised
//! fine-tuning and preference alignment in one loss, without a reference model. With `ℓ` a
//! completion's length-normalised log-probability (its mean log-prob per completion token) and
//! `log odds(ℓ) = ℓ − log(1 − e^ℓ)`, per pair
//!
//! `r = log odds(ℓ⁺) − log odds(ℓ⁻)`,
//! `L = −ℓ⁺ − λ·log σ(r)`,
//!
//! the mean over pairs (λ = 0.1, TRL's `ORPOTrainer` default). The first term is the chosen
//! completion's NLL per token, as in the paper's expectation over pairs; TRL takes it as one
//! token mean over the batch's chosen completions (the same when they are equally long). The
//! implicit rewards are `λ·ℓ`, their margin `λ·(ℓ⁺ − ℓ⁻)`; accuracy counts positive margins.

use burn::tensor::Tensor;
use burn::tensor::activation::log_sigmoid;
use posttrain_model::Gemma2ForCausalLM;
use posttrain_train::logprobs::mean_logprobs;
use posttrain_train::{
    At, MetricsLog, OptimConfig, Resume, Run, Saver, Schedule, Share, Stage, Step, StepLog,
    train as train_loop,
};
use serde_json::{Map, Value};

use crate::train::{PairExamples, PreferenceStats, both_sides, pair_lengths, preference_row};
use crate::{DpoError, DpoReport};

#[derive(Debug, Clone, serde::Serialize)]
pub struct OrpoConfig {
    pub optim: OptimConfig,
    /// Pairs per micro-batch.
    pub batch_size: usize,
    pub eval_every: usize,
    pub seed: u64,
    /// λ: weight of the odds-ratio term.
    pub lambda: f64,
}

/// `(L, r)` of pairs with length-normalised log-probs `chosen`, `rejected`
/// `[n]`: the mean loss and the log odds ratios.
pub fn odds_ratio_loss(
    chosen: Tensor<1>,
    rejected: Tensor<1>,
    lambda: f64,
) -> (Tensor<1>, Tensor<1>) {
    let log_odds = |l: Tensor<1>| l.clone().sub(l.exp().neg().log1p());
    let r = log_odds(chosen.clone()).sub(log_odds(rejected));
    let loss = chosen.neg().sub(log_sigmoid(r.clone()).mul_scalar(lambda));
    (loss.mean(), r)
}

/// `rows` of `pairs` under `model`: `L`, then per pair `r` and the margin
/// `λ·(ℓ⁺ − ℓ⁻)`, and the tokens.
fn pair_loss(
    model: &Gemma2ForCausalLM,
    pairs: &[PairExamples],
    rows: &[usize],
    pad: u32,
    lambda: f64,
) -> (Tensor<1>, [Vec<f64>; 2], u64) {
    let b = rows.len();
    let (mean, tokens) = mean_logprobs(model, &both_sides(pairs, rows), pad);
    let (chosen, rejected) = (mean.clone().narrow(0, 0, b), mean.narrow(0, b, b));
    let margin = chosen.clone().sub(rejected.clone()).mul_scalar(lambda);
    let (loss, r) = odds_ratio_loss(chosen, rejected, lambda);
    let read = |t: Tensor<1>| t.inner().into_data().try_into_vec_as::<f64>().expect("f64");
    (loss, [read(r), read(margin)], tokens)
}

struct OrpoStage<'a> {
    train: &'a [PairExamples],
    eval: &'a [PairExamples],
    pad: u32,
    cfg: &'a OrpoConfig,
}

impl Stage<Gemma2ForCausalLM> for OrpoStage<'_> {
    type Report = DpoReport;
    type Error = DpoError;
    const VALUES: &'static [&'static str] = &["log_odds_ratio", "margin"];

    fn name(&self) -> &str {
        "orpo"
    }

    fn loss(
        &mut self,
        _at: At,
        rows: &[usize],
        model: &Gemma2ForCausalLM,
    ) -> Result<Share, DpoError> {
        let (loss, values, tokens) = pair_loss(model, self.train, rows, self.pad, self.cfg.lambda);
        Ok(Share::new(loss, rows.len() as f64, tokens).with_values(values.into()))
    }

    fn metrics(&mut self, s: &Step<'_>, report: &mut Run<DpoReport>) -> Result<StepLog, DpoError> {
        let mut log = preference_row(s, s.values("margin"), report);
        let r = s.values("log_odds_ratio");
        let mean = r.iter().sum::<f64>() / r.len().max(1) as f64;
        log.row.insert("log_odds_ratio".into(), mean.into());
        Ok(log)
    }

    fn evaluate(
        &mut self,
        step: usize,
        model: &Gemma2ForCausalLM,
        row: &mut Map<String, Value>,
        report: &mut DpoReport,
    ) -> Result<Option<String>, DpoError> {
        let model = burn::module::Module::valid(model);
        let (mut loss, mut margins) = (0.0, Vec::new());
        let all: Vec<usize> = (0..self.eval.len()).collect();
        for rows in all.chunks(self.cfg.batch_size.max(1)) {
            let (l, [_, m], _) = pair_loss(&model, self.eval, rows, self.pad, self.cfg.lambda);
            loss += l.into_scalar::<f64>() * rows.len() as f64;
            margins.extend(m);
        }
        let s = PreferenceStats::of(loss / all.len().max(1) as f64, &margins);
        Ok((!all.is_empty()).then(|| s.record(("orpo", step), row, report)))
    }
}

/// Trains `model` on `train` pairs (no reference); `resume` and `saver` as
/// in every stage.
pub fn train_orpo(
    model: Gemma2ForCausalLM,
    (train, eval): (&[PairExamples], &[PairExamples]),
    pad: u32,
    cfg: &OrpoConfig,
    log: &mut MetricsLog,
    resume: Option<&Resume>,
    saver: Option<Saver<Gemma2ForCausalLM>>,
) -> Result<(Gemma2ForCausalLM, Run<DpoReport>), DpoError> {
    if train.is_empty() {
        return Err(DpoError::NoData);
    }
    let mut stage = OrpoStage {
        train,
        eval,
        pad,
        cfg,
    };
    let data = (pair_lengths(train), cfg.batch_size);
    let schedule = Schedule::new(&cfg.optim, data, cfg.eval_every, cfg.seed);
    train_loop(&mut stage, model, schedule, log, resume, saver)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    fn t(v: &[f32]) -> Tensor<1> {
        Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), &Device::default())
    }

    #[test]
    fn loss_and_log_odds_ratios_equal_hand_computed_values() {
        // ℓ⁺ = −1, ℓ⁻ = −2: r = −1 − log(1 − e⁻¹) + 2 + log(1 − e⁻²) = 1.3132617,
        // L = 1 + 0.1·log(1 + e^−r) = 1.0238183; ℓ⁺ = −0.5, ℓ⁻ = −0.25:
        // r = −0.8259394, L = 0.5 + 0.1·1.1890699 = 0.6189070; mean 0.8213626
        let (loss, r) = odds_ratio_loss(t(&[-1.0, -0.5]), t(&[-2.0, -0.25]), 0.1);
        let r = r.into_data().try_into_vec_as::<f64>().unwrap();
        assert!((r[0] - 1.313_261_7).abs() < 1e-5, "{r:?}");
        assert!((r[1] + 0.825_939_4).abs() < 1e-5, "{r:?}");
        let loss = loss.into_scalar::<f64>();
        assert!((loss - 0.821_362_6).abs() < 1e-5, "{loss}");
    }

    #[test]
    fn without_the_odds_ratio_term_the_loss_is_the_chosen_nll() {
        let (loss, _) = odds_ratio_loss(t(&[-1.5, -0.5]), t(&[-0.1, -3.0]), 0.0);
        assert!((loss.into_scalar::<f64>() - 1.0).abs() < 1e-6);
    }
}
