//! Odds-ratio preference optimisation (ORPO, Hong et al. 2024, arXiv
//! 2403.07691): supervised fine-tuning and preference alignment in one loss,
//! without a reference model. With `ℓ` a completion's length-normalised
//! log-probability (its mean log-prob per completion token) and
//! `log odds(ℓ) = ℓ − log(1 − e^ℓ)`, per pair
//!
//! `r = log odds(ℓ⁺) − log odds(ℓ⁻)`,
//! `L = −ℓ⁺ − λ·log σ(r)`,
//!
//! the mean over pairs (λ = 0.1, TRL's `ORPOTrainer` default). The first
//! term is the chosen completion's NLL per token, as in the paper's
//! expectation over pairs; TRL takes it as one token mean over the batch's
//! chosen completions (the same when they are equally long). The implicit
//! rewards are `λ·ℓ`: accuracy counts `ℓ⁺ > ℓ⁻`, margin `λ·(ℓ⁺ − ℓ⁻)`.

use burn::tensor::activation::log_sigmoid;
use burn::tensor::{Device, Tensor, TensorData};
use posttrain_datasets::Example;
use posttrain_model::Gemma2ForCausalLM;
use posttrain_train::logprobs::{batch_of, sequence_logprobs};
use posttrain_train::{
    At, MetricsLog, OptimConfig, Resume, Run, Saver, Schedule, Share, Stage, Step, StepLog, train,
};
use serde_json::json;

use crate::DpoError;
use crate::train::{PairExamples, PreferenceStats, pair_lengths};

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

/// Each example's completion tokens.
fn completion_tokens(examples: &[Example], device: &Device) -> Tensor<1> {
    let n: Vec<f32> = examples
        .iter()
        .map(|e| e.target.iter().skip(1).filter(|&&t| t).count().max(1) as f32)
        .collect();
    Tensor::from_data(TensorData::new(n.clone(), [n.len()]), device)
}

/// `(L, r, ℓ⁺ − ℓ⁻)` of `pairs` under `model`: chosen and rejected sides as
/// one batch.
fn pair_loss(
    model: &Gemma2ForCausalLM,
    pairs: &[&PairExamples],
    pad: u32,
    lambda: f64,
) -> (Tensor<1>, Vec<f64>, Vec<f64>, u64) {
    let b = pairs.len();
    let rows: Vec<Example> = pairs
        .iter()
        .map(|p| p.chosen.clone())
        .chain(pairs.iter().map(|p| p.rejected.clone()))
        .collect();
    let device = model.model.embed_tokens.weight.device();
    let (batch, weights) = batch_of(&rows, pad, &device);
    let tokens = batch.valid.iter().filter(|&&v| v).count() as u64;
    let mean =
        sequence_logprobs(model, &batch, weights, false).sums / completion_tokens(&rows, &device);
    let (chosen, rejected) = (mean.clone().narrow(0, 0, b), mean.narrow(0, b, b));
    let gap = chosen.clone().sub(rejected.clone()).inner().into_data();
    let (loss, r) = odds_ratio_loss(chosen, rejected, lambda);
    let read = |d: TensorData| d.try_into_vec_as::<f64>().expect("f64");
    (loss, read(r.inner().into_data()), read(gap), tokens)
}

/// Held-out loss, accuracy and margin of the implicit rewards (no gradients).
pub fn evaluate(
    model: &Gemma2ForCausalLM,
    pairs: &[PairExamples],
    pad: u32,
    cfg: &OrpoConfig,
) -> PreferenceStats {
    let model = burn::module::Module::valid(model);
    let (mut loss, mut gaps) = (0.0, Vec::new());
    for chunk in pairs.chunks(cfg.batch_size.max(1)) {
        let refs: Vec<&PairExamples> = chunk.iter().collect();
        let (l, _, g, _) = pair_loss(&model, &refs, pad, cfg.lambda);
        loss += l.into_scalar::<f64>() * chunk.len() as f64;
        gaps.extend(g);
    }
    let n = gaps.len().max(1) as f64;
    PreferenceStats {
        loss: loss / n,
        accuracy: gaps.iter().filter(|&&g| g > 0.0).count() as f64 / n,
        margin: cfg.lambda * gaps.iter().sum::<f64>() / n,
        pairs: gaps.len(),
    }
}

struct OrpoStage<'a> {
    train: &'a [PairExamples],
    eval: &'a [PairExamples],
    pad: u32,
    cfg: &'a OrpoConfig,
}

impl Stage<Gemma2ForCausalLM> for OrpoStage<'_> {
    type Report = crate::DpoReport;
    type Error = DpoError;
    const VALUES: &'static [&'static str] = &["log_odds_ratio", "gap"];

    fn name(&self) -> &str {
        "orpo"
    }

    fn loss(
        &mut self,
        _at: At,
        rows: &[usize],
        model: &Gemma2ForCausalLM,
    ) -> Result<Share, DpoError> {
        let pairs: Vec<&PairExamples> = rows.iter().map(|&i| &self.train[i]).collect();
        let (loss, r, gap, tokens) = pair_loss(model, &pairs, self.pad, self.cfg.lambda);
        Ok(Share {
            values: vec![r, gap],
            ..Share::new(loss, rows.len() as f64, tokens)
        })
    }

    fn metrics(
        &mut self,
        s: &Step<'_>,
        report: &mut Run<crate::DpoReport>,
    ) -> Result<StepLog, DpoError> {
        let (r, gap) = (s.values("log_odds_ratio"), s.values("gap"));
        let n = gap.len().max(1) as f64;
        report.pairs_seen += gap.len() as u64;
        Ok(StepLog::of(json!({
            "step": s.step + 1,
            "loss": s.loss,
            "log_odds_ratio": r.iter().sum::<f64>() / n,
            "reward_accuracy": gap.iter().filter(|&&g| g > 0.0).count() as f64 / n,
            "reward_margin": self.cfg.lambda * gap.iter().sum::<f64>() / n,
            "lr": s.optim.lr,
            "grad_norm": s.optim.grad_norm,
            "pairs": report.pairs_seen,
            "epoch": s.epoch,
        })))
    }

    fn evaluate(
        &mut self,
        step: usize,
        model: &Gemma2ForCausalLM,
        row: &mut serde_json::Map<String, serde_json::Value>,
        report: &mut crate::DpoReport,
    ) -> Result<Option<String>, DpoError> {
        if self.eval.is_empty() {
            return Ok(None);
        }
        let s = evaluate(model, self.eval, self.pad, self.cfg);
        row.insert("eval_loss".into(), s.loss.into());
        row.insert("eval_reward_accuracy".into(), s.accuracy.into());
        row.insert("eval_reward_margin".into(), s.margin.into());
        report.eval = Some(s);
        let (loss, accuracy) = (s.loss, s.accuracy);
        Ok(Some(format!(
            "orpo: step {}: eval loss {loss:.4}, reward accuracy {accuracy:.3}",
            step + 1
        )))
    }
}

/// Trains `model` on `train` pairs (no reference); `resume` and `saver` as
/// in every stage.
pub fn train_orpo(
    model: Gemma2ForCausalLM,
    (train_pairs, eval): (&[PairExamples], &[PairExamples]),
    pad: u32,
    cfg: &OrpoConfig,
    log: &mut MetricsLog,
    resume: Option<&Resume>,
    saver: Option<Saver<Gemma2ForCausalLM>>,
) -> Result<(Gemma2ForCausalLM, Run<crate::DpoReport>), DpoError> {
    if train_pairs.is_empty() {
        return Err(DpoError::NoData);
    }
    let mut stage = OrpoStage {
        train: train_pairs,
        eval,
        pad,
        cfg,
    };
    let schedule = Schedule {
        optim: &cfg.optim,
        data: posttrain_datasets::Epochs::new(pair_lengths(train_pairs), cfg.batch_size, cfg.seed),
        eval_every: cfg.eval_every,
        seed: cfg.seed,
    };
    train(&mut stage, model, schedule, log, resume, saver)
}

#[cfg(test)]
mod tests {
    use super::*;

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
