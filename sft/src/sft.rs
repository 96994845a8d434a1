//! The `sft` and `pretrain` stage in the shared loop (`train::train`): its
//! loss on one share of a micro-batch of the seeded, length-bucketed epoch
//! stream. A micro-batch is either data
//! (cross-entropy on the completion, optionally mixed with distillation from
//! stored top-k or a live teacher) or, with probability λ, on-policy: the
//! student samples the completions and the loss is GKD's JSD_β against the
//! live teacher. Every `eval_every` steps: eval loss and the task score of
//! greedy samples.

use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};
use posttrain_datasets::Example;
use posttrain_model::lm_head::{RowTerms, Slots, target_ids, target_logprobs};
use posttrain_model::{Gemma2ForCausalLM, SamplingConfig, TokenBatch};
use posttrain_train::rollout::complete;
use posttrain_train::{
    At, LoopError, MetricsLog, OptimConfig, Resume, Run, Saver, Schedule, Share, Stage, Step,
    StepLog, Vocab, make_batch, train as train_loop,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::ce::{cross_entropy, weighted_mean};
use crate::distill::{forward_kl, mix};
use crate::eval::{EvalSet, TaskScore, eval_loss, task_score};
use crate::gkd::generalized_jsd;
use crate::topk_kd::topk_kl;

/// Where the distillation target comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Distill {
    /// Cross-entropy only.
    None,
    /// The stored teacher top-k of every row (`rest`: add the rest-of-mass bucket).
    TopK { rest: bool },
    /// The teacher's full distribution, computed in the step.
    Live,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct OnPolicy {
    /// λ: probability that a micro-batch's completions come from the student.
    pub fraction: f64,
    /// β of JSD_β: 0 forward KL, 1 reverse KL.
    pub beta: f64,
    /// Student sampling temperature.
    pub temperature: f32,
    pub max_new_tokens: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SftConfig {
    pub optim: OptimConfig,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    pub eval_every: usize,
    pub seed: u64,
    pub distill: Distill,
    /// α: weight of the distillation term.
    pub alpha: f64,
    /// τ: distillation temperature.
    pub temperature: f64,
    pub on_policy: Option<OnPolicy>,
    /// Greedy eval completions scored per eval (0: off).
    pub eval_samples: usize,
    pub eval_max_new_tokens: usize,
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct SftReport {
    pub eval_loss: Option<f64>,
    pub eval_score: Option<TaskScore>,
    pub on_policy_batches: usize,
    pub tokens: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SftError {
    #[error(transparent)]
    Loop(#[from] LoopError),
    #[error("no training examples")]
    NoData,
    #[error("{0} needs --teacher")]
    NeedsTeacher(&'static str),
    #[error("row {row}: {reason}")]
    TopK { row: usize, reason: String },
}

impl SftConfig {
    /// Refuses settings that cannot run: live or on-policy distillation
    /// without a teacher.
    pub fn check(&self, has_teacher: bool) -> Result<(), SftError> {
        if self.distill == Distill::Live && !has_teacher {
            return Err(SftError::NeedsTeacher("--kd live"));
        }
        if self.on_policy.as_ref().is_some_and(|op| op.fraction > 0.0) && !has_teacher {
            return Err(SftError::NeedsTeacher(
                "--on-policy-fraction (the teacher scores the student's samples)",
            ));
        }
        Ok(())
    }
}

/// Every row has stored top-k with one k throughout, ids inside the
/// vocabulary and finite log-probabilities ≤ 0.
pub fn check_topk(examples: &[Example], vocab: usize) -> Result<(), SftError> {
    let mut k = None;
    for (i, e) in examples.iter().enumerate() {
        let refuse = |reason: String| Err(SftError::TopK { row: i + 1, reason });
        let Some(top) = &e.topk else {
            return refuse(
                "no teacher_topk_ids / teacher_topk_logprobs (needed by --kd topk)".into(),
            );
        };
        for (ids, lps) in top.ids.iter().zip(&top.logprobs) {
            let here = ids.len();
            if *k.get_or_insert(here) != here || lps.len() != here || here == 0 {
                let first = k.unwrap_or(0);
                let other = here.max(lps.len());
                return refuse(format!(
                    "teacher top-k rows of different lengths ({first} and {other})"
                ));
            }
            if let Some(id) = ids.iter().find(|&&i| i as usize >= vocab) {
                return refuse(format!(
                    "teacher top-k id {id} is outside the vocabulary of {vocab}"
                ));
            }
            if let Some(lp) = lps.iter().find(|lp| !lp.is_finite() || **lp > 1e-4) {
                return refuse(format!(
                    "teacher top-k log-prob {lp} is not a finite log-probability"
                ));
            }
        }
    }
    Ok(())
}

/// Loss parts of one micro-batch.
struct Parts {
    loss: Tensor<1>,
    ce: Option<Tensor<1>>,
    kl: Option<Tensor<1>>,
    jsd: Option<Tensor<1>>,
}

/// Stored top-k as `[b, len − 1, k]` ids and log-probs aligned with the
/// positions that predict each target (zeros elsewhere).
fn topk_tensors(examples: &[&Example], len: usize, device: &Device) -> (Tensor<3, Int>, Tensor<3>) {
    let k = examples
        .iter()
        .find_map(|e| e.topk.as_ref().and_then(|t| t.ids.first().map(Vec::len)))
        .unwrap_or(1);
    let b = examples.len();
    let mut ids = vec![0i64; b * (len - 1) * k];
    let mut lps = vec![0f32; b * (len - 1) * k];
    for (r, e) in examples.iter().enumerate() {
        let Some(top) = &e.topk else { continue };
        let mut row = 0;
        for p in 0..len - 1 {
            if !e.target.get(p + 1).copied().unwrap_or(false) {
                continue;
            }
            let at = (r * (len - 1) + p) * k;
            for j in 0..k {
                ids[at + j] = i64::from(top.ids[row][j]);
                lps[at + j] = top.logprobs[row][j];
            }
            row += 1;
        }
    }
    (
        Tensor::from_data(TensorData::new(ids, [b, len - 1, k]), device),
        Tensor::from_data(TensorData::new(lps, [b, len - 1, k]), device),
    )
}

/// The data loss: CE, mixed with KD from stored top-k or the live teacher.
fn data_loss(
    model: &Gemma2ForCausalLM,
    teacher: Option<&Gemma2ForCausalLM>,
    examples: &[&Example],
    batch: &TokenBatch,
    weights: Tensor<2>,
    cfg: &SftConfig,
) -> Parts {
    if model.chunks_head(batch) {
        return chunked_loss(model, teacher, examples, batch, weights, cfg, None);
    }
    let logits = model.forward(batch);
    let [_, t, _] = logits.dims();
    let ce = cross_entropy(logits.clone(), batch, weights.clone());
    let kl = match (cfg.distill, teacher) {
        _ if cfg.alpha == 0.0 => None,
        (Distill::None, _) | (Distill::Live, None) => None,
        (Distill::TopK { rest }, _) => {
            let (ids, lps) = topk_tensors(examples, t, &logits.device());
            let kl = topk_kl(logits.narrow(1, 0, t - 1), ids, lps, cfg.temperature, rest);
            Some(weighted_mean(kl, weights))
        }
        (Distill::Live, Some(teacher)) => {
            let teacher_logits =
                posttrain_model::on_autodiff(teacher.forward(batch), &logits.device());
            let kl = forward_kl(
                logits.narrow(1, 0, t - 1),
                teacher_logits.narrow(1, 0, t - 1),
                cfg.temperature,
            );
            Some(weighted_mean(kl, weights))
        }
    };
    let loss = match &kl {
        Some(kl) => mix(ce.clone(), kl.clone(), cfg.alpha, cfg.temperature),
        None => ce.clone(),
    };
    Parts {
        loss,
        ce: Some(ce),
        kl,
        jsd: None,
    }
}

/// [`data_loss`] (or, with `on_policy`, [`on_policy_loss`]) through the
/// chunked head: the same per-position terms, summed chunk by chunk over
/// only the target positions.
fn chunked_loss(
    model: &Gemma2ForCausalLM,
    teacher: Option<&Gemma2ForCausalLM>,
    examples: &[&Example],
    batch: &TokenBatch,
    weights: Tensor<2>,
    cfg: &SftConfig,
    on_policy: Option<&OnPolicy>,
) -> Parts {
    let (b, t) = (batch.batch, batch.len);
    let host: Vec<f32> = weights
        .clone()
        .inner()
        .into_data()
        .try_to_vec()
        .expect("f32");
    let slots = Slots::nonzero(&host, batch);
    let count = host.iter().sum::<f32>().max(1.0);
    let w = slots
        .select(weights.inner().reshape([b * (t - 1)]))
        .div_scalar(count);
    let hidden = model.model.forward(batch, None);
    let rows = model.slot_hidden(hidden, &slots);
    let device = rows.device().inner();
    let targets = target_ids(&slots, batch, &device);
    let teacher_rows = teacher
        .filter(|_| on_policy.is_some() || (cfg.distill == Distill::Live && cfg.alpha != 0.0))
        .map(|tm| (tm, tm.slot_hidden(tm.model.forward(batch, None), &slots)));
    let topk = match cfg.distill {
        Distill::TopK { rest } if on_policy.is_none() && cfg.alpha != 0.0 => {
            let (ids, lps) = topk_tensors(examples, t, &device);
            let k = ids.dims()[2];
            let ids = slots.select(ids.reshape([b * (t - 1), k]));
            let lps = slots.select(lps.reshape([b * (t - 1), k]));
            Some((ids, lps, k, rest))
        }
        _ => None,
    };
    let tau = cfg.temperature;
    let out = model.head_terms(rows, model.head_chunk(), |z, r| {
        let m = r.len();
        let w = w.clone().narrow(0, r.start, m);
        let teacher_z = teacher_rows
            .as_ref()
            .map(|(tm, rows)| tm.row_logits(rows.clone().narrow(0, r.start, m)));
        if let Some(op) = on_policy {
            let jsd = generalized_jsd(z, teacher_z.expect("GKD has a teacher"), op.beta, tau)
                .reshape([m])
                * w;
            return RowTerms {
                grad: jsd.clone().mul_scalar(tau * tau),
                values: vec![jsd],
            };
        }
        let ce =
            target_logprobs(z.clone(), targets.clone().narrow(0, r.start, m)).neg() * w.clone();
        let kl = match (&topk, teacher_z) {
            (Some((ids, lps, k, rest)), _) => Some(topk_kl(
                z,
                ids.clone().narrow(0, r.start, m).reshape([1, m, *k]),
                lps.clone().narrow(0, r.start, m).reshape([1, m, *k]),
                tau,
                *rest,
            )),
            (None, Some(tz)) => Some(forward_kl(z, tz, tau)),
            (None, None) => None,
        };
        match kl.map(|kl| kl.reshape([m]) * w) {
            Some(kl) => RowTerms {
                grad: mix(ce.clone(), kl.clone(), cfg.alpha, tau),
                values: vec![ce, kl],
            },
            None => RowTerms {
                grad: ce.clone(),
                values: vec![ce],
            },
        }
    });
    let loss = out.grad.sum();
    let mut values = out.values.into_iter().map(|v| v.sum());
    if on_policy.is_some() {
        return Parts {
            loss,
            ce: None,
            kl: None,
            jsd: values.next(),
        };
    }
    Parts {
        loss,
        ce: values.next(),
        kl: values.next(),
        jsd: None,
    }
}

/// Replaces each example's completion by one the student samples.
fn sample_completions(
    model: &Gemma2ForCausalLM,
    examples: &[&Example],
    vocab: &Vocab,
    op: &OnPolicy,
    (seed, first): (u64, u64),
) -> Vec<Example> {
    let prompts: Vec<Vec<u32>> = examples
        .iter()
        .map(|e| e.ids[..e.prompt_len()].to_vec())
        .collect();
    let sampling = SamplingConfig {
        max_new_tokens: op.max_new_tokens.max(1),
        temperature: op.temperature,
        seed,
        stop_ids: vocab.stop_ids.clone(),
        ..SamplingConfig::default()
    };
    complete(&model.valid(), prompts, &sampling, vocab, true, first).examples
}

/// The target tokens of `examples`: the units their loss is a mean over.
fn target_count(examples: &[&Example]) -> f64 {
    examples
        .iter()
        .map(|e| e.target.iter().skip(1).filter(|&&t| t).count() as f64)
        .sum()
}

/// GKD on the student's own completions.
fn on_policy_loss(
    model: &Gemma2ForCausalLM,
    teacher: &Gemma2ForCausalLM,
    batch: &TokenBatch,
    weights: Tensor<2>,
    cfg: &SftConfig,
    op: &OnPolicy,
) -> Parts {
    if model.chunks_head(batch) {
        return chunked_loss(model, Some(teacher), &[], batch, weights, cfg, Some(op));
    }
    let logits = model.forward(batch);
    let [_, t, _] = logits.dims();
    let teacher_logits = posttrain_model::on_autodiff(teacher.forward(batch), &logits.device());
    let jsd = generalized_jsd(
        logits.narrow(1, 0, t - 1),
        teacher_logits.narrow(1, 0, t - 1),
        op.beta,
        cfg.temperature,
    );
    let jsd = weighted_mean(jsd, weights);
    Parts {
        loss: jsd.clone().mul_scalar(cfg.temperature * cfg.temperature),
        ce: None,
        kl: None,
        jsd: Some(jsd),
    }
}

/// `pretrain` and `sft` in the shared loop.
struct LmStage<'a> {
    name: &'a str,
    teacher: Option<Gemma2ForCausalLM>,
    train: &'a [Example],
    eval: &'a EvalSet,
    vocab: &'a Vocab<'a>,
    cfg: &'a SftConfig,
    on_policy: Option<&'a OnPolicy>,
    device: Device,
    start: Instant,
}

impl LmStage<'_> {
    /// Whether micro-batch `at` is on-policy: a uniform draw of its own
    /// seeded stream below λ, the same on every rank.
    fn on_policy(&self, at: At) -> Option<&OnPolicy> {
        let seed = self.cfg.seed ^ 0x6f6e_706f_6c69_6379;
        let mut coin = StdRng::seed_from_u64(seed ^ at.index().wrapping_mul(0x9E37_79B9));
        self.on_policy
            .filter(|op| coin.random::<f64>() < op.fraction)
    }
}

impl Stage<Gemma2ForCausalLM> for LmStage<'_> {
    type Report = SftReport;
    type Error = SftError;
    const MEANS: &'static [&'static str] = &["ce", "kl", "jsd"];
    const COUNTS: &'static [&'static str] = &["on_policy_batches"];

    fn name(&self) -> &str {
        self.name
    }

    fn loss(
        &mut self,
        at: At,
        rows: &[usize],
        model: &Gemma2ForCausalLM,
    ) -> Result<Share, SftError> {
        let (cfg, pad) = (self.cfg, self.vocab.tokenizer.pad);
        let examples: Vec<&Example> = rows.iter().map(|&i| &self.train[i]).collect();
        let sampled: Vec<Example>;
        let on_policy = self.on_policy(at);
        let examples: Vec<&Example> = match on_policy {
            Some(op) => {
                // a row's stream is its place in the micro-batch, whichever rank samples it
                let seed = cfg.seed ^ at.index().wrapping_mul(0x9E37_79B9);
                let streams = (seed, at.first as u64);
                sampled = sample_completions(model, &examples, self.vocab, op, streams);
                sampled.iter().collect()
            }
            None => examples,
        };
        let (batch, weights) = make_batch(&examples, pad, &self.device);
        let parts = match on_policy {
            Some(op) => {
                let teacher = self.teacher.as_ref().expect("checked before the loop");
                on_policy_loss(model, teacher, &batch, weights, cfg, op)
            }
            None => data_loss(
                model,
                self.teacher.as_ref(),
                &examples,
                &batch,
                weights,
                cfg,
            ),
        };
        let read = |t: &Option<Tensor<1>>| t.as_ref().map(|t| t.clone().into_scalar::<f64>());
        let tokens = batch.valid.iter().filter(|&&v| v).count() as u64;
        Ok(Share {
            means: vec![read(&parts.ce), read(&parts.kl), read(&parts.jsd)],
            // one rank counts the micro-batch
            counts: vec![f64::from(u8::from(on_policy.is_some() && at.rank == 0))],
            ..Share::new(parts.loss, target_count(&examples), tokens)
        })
    }

    fn metrics(&mut self, s: &Step<'_>, report: &mut Run<SftReport>) -> Result<StepLog, SftError> {
        report.tokens += s.tokens;
        let sampled = s.count("on_policy_batches") as usize;
        report.on_policy_batches += sampled;
        let mut row = json!({
            "step": s.step + 1,
            "loss": s.loss,
            "lr": s.optim.lr,
            "grad_norm": s.optim.grad_norm,
            "tokens": report.tokens,
            "tokens_per_s": report.tokens as f64 / self.start.elapsed().as_secs_f64(),
            "epoch": s.epoch,
        });
        for name in Self::MEANS {
            if let Some(m) = s.mean(name) {
                row[*name] = m.into();
            }
        }
        if self.on_policy.is_some() {
            row["on_policy_batches"] = sampled.into();
        }
        Ok(StepLog::of(row))
    }

    fn evaluate(
        &mut self,
        step: usize,
        model: &Gemma2ForCausalLM,
        row: &mut serde_json::Map<String, serde_json::Value>,
        report: &mut SftReport,
    ) -> Result<Option<String>, SftError> {
        let (eval, cfg) = (self.eval, self.cfg);
        if eval.examples.is_empty() {
            return Ok(None);
        }
        let e = eval_loss(
            model,
            &eval.examples,
            self.vocab.tokenizer.pad,
            cfg.batch_size,
        );
        row.insert("eval_loss".into(), e.into());
        report.eval_loss = Some(e);
        let s = task_score(
            model,
            eval,
            self.vocab.tokenizer,
            &self.vocab.stop_ids,
            cfg.eval_samples,
            cfg.eval_max_new_tokens,
            cfg.batch_size.max(16),
        );
        let shown = match s {
            Some(s) => {
                row.insert("eval_score".into(), s.score.into());
                row.insert("eval_accuracy".into(), s.accuracy.into());
                format!(", score {:.3}, accuracy {:.3}", s.score, s.accuracy)
            }
            None => String::new(),
        };
        report.eval_score = s;
        Ok(Some(format!(
            "{}: step {}: eval loss {e:.4}{shown}",
            self.name,
            step + 1
        )))
    }
}

/// Trains `model`; with `resume` it continues a saved run (the model is the
/// saved one), and `saver` stores the state every N steps.
#[allow(clippy::too_many_arguments)]
pub fn train_lm(
    stage: &str,
    model: Gemma2ForCausalLM,
    teacher: Option<&Gemma2ForCausalLM>,
    train: &[Example],
    eval: &EvalSet,
    vocab: &Vocab,
    cfg: &SftConfig,
    log: &mut MetricsLog,
    resume: Option<&Resume>,
    saver: Option<Saver<Gemma2ForCausalLM>>,
) -> Result<(Gemma2ForCausalLM, Run<SftReport>), SftError> {
    if train.is_empty() {
        return Err(SftError::NoData);
    }
    cfg.check(teacher.is_some())?;
    if let Distill::TopK { .. } = cfg.distill {
        check_topk(train, model.model.embed_tokens.weight.dims()[0])?;
    }
    let on_policy = cfg.on_policy.as_ref().filter(|op| op.fraction > 0.0);
    let mut lm = LmStage {
        name: stage,
        teacher: teacher.map(Module::valid),
        train,
        eval,
        vocab,
        cfg,
        on_policy,
        device: model.model.embed_tokens.weight.device(),
        start: Instant::now(),
    };
    let lengths = train.iter().map(|e| e.ids.len()).collect();
    let schedule = Schedule::new(
        &cfg.optim,
        (lengths, cfg.batch_size),
        cfg.eval_every,
        cfg.seed,
    );
    train_loop(&mut lm, model, schedule, log, resume, saver)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::activation::log_softmax;
    use posttrain_datasets::ChatTokenizer;
    use posttrain_datasets::TopK;
    use posttrain_model::params::named_params;
    use posttrain_model::{Gemma2Config, RandomInit};

    pub(super) const VOCAB: usize = 24;

    fn tokenizer() -> ChatTokenizer {
        let corpus = ["What is one plus two? One plus two is three.", "user model"];
        ChatTokenizer::train(corpus.iter(), VOCAB).unwrap()
    }

    pub(super) fn model(seed: u64, hidden: usize, device: &Device) -> Gemma2ForCausalLM {
        let mut c = Gemma2Config::new(VOCAB, hidden, 2 * hidden, 2, 2, 1, 8, 4);
        c.max_position_embeddings = 32;
        Gemma2ForCausalLM::new(&c, &mut RandomInit::new(seed), device).unwrap()
    }

    /// Prompts of 3–5 tokens, completions of 2–4 (ids ≥ 6: no control tokens).
    fn data() -> Vec<Example> {
        (0..12u32)
            .map(|i| {
                let p = 3 + (i % 3) as usize;
                let c = 2 + (i % 3) as usize;
                let ids: Vec<u32> = (0..p + c)
                    .map(|j| 6 + (i * 7 + j as u32 * 3) % 18)
                    .collect();
                let target = (0..ids.len()).map(|j| j >= p).collect();
                Example {
                    ids,
                    target,
                    topk: None,
                }
            })
            .collect()
    }

    pub(super) fn config(distill: Distill, alpha: f64, on_policy: Option<OnPolicy>) -> SftConfig {
        SftConfig {
            optim: OptimConfig {
                steps: 3,
                lr: 1e-2,
                warmup: 0,
                min_lr_ratio: 1.0,
                weight_decay: 0.0,
                beta1: 0.9,
                beta2: 0.95,
                clip: 1.0,
                accumulation: 2,
            },
            batch_size: 4,
            eval_every: 0,
            seed: 5,
            distill,
            alpha,
            temperature: 2.0,
            on_policy,
            eval_samples: 0,
            eval_max_new_tokens: 4,
        }
    }

    fn run(
        cfg: &SftConfig,
        teacher: Option<&Gemma2ForCausalLM>,
        train: &[Example],
    ) -> (
        std::collections::BTreeMap<String, Vec<f32>>,
        Run<SftReport>,
        String,
    ) {
        let device = Device::default().autodiff();
        let tok = tokenizer();
        let vocab = Vocab {
            tokenizer: &tok,
            stop_ids: vec![tok.end_of_turn],
            max_len: 32,
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut log = MetricsLog::create(&path).unwrap();
        let (m, report) = train_lm(
            "test",
            model(1, 16, &device),
            teacher,
            train,
            &EvalSet::default(),
            &vocab,
            cfg,
            &mut log,
            None,
            None,
        )
        .unwrap();
        drop(log);
        let params = named_params(&m)
            .into_iter()
            .map(|(k, v)| (k, v.data))
            .collect();
        (params, report, std::fs::read_to_string(path).unwrap())
    }

    #[test]
    fn alpha_zero_is_plain_ce_and_lambda_zero_is_plain_kd() {
        let teacher = model(9, 32, &Device::default());
        let train = data();
        let (ce, _, _) = run(&config(Distill::None, 0.0, None), None, &train);
        let (live0, _, _) = run(&config(Distill::Live, 0.0, None), Some(&teacher), &train);
        assert_eq!(ce, live0, "α = 0 must be exactly cross-entropy");
        let (kd, r1, _) = run(&config(Distill::Live, 0.5, None), Some(&teacher), &train);
        let gkd0 = OnPolicy {
            fraction: 0.0,
            beta: 0.5,
            temperature: 1.0,
            max_new_tokens: 4,
        };
        let (kd0, r2, _) = run(
            &config(Distill::Live, 0.5, Some(gkd0)),
            Some(&teacher),
            &train,
        );
        assert_eq!(kd, kd0, "λ = 0 must be exactly the data KD");
        assert_eq!(r2.on_policy_batches, 0);
        assert_eq!(r1.loss.first_loss, r2.loss.first_loss);
        assert_ne!(kd, ce);
    }

    #[test]
    fn stored_top_k_over_the_whole_vocabulary_equals_live_distillation() {
        let device = Device::default();
        let teacher = model(9, 32, &device);
        let mut train = data();
        for e in &mut train {
            let batch = TokenBatch::new(
                std::slice::from_ref(&e.ids),
                0,
                posttrain_model::Padding::Right,
            );
            let logp = log_softmax(teacher.forward(&batch), 2)
                .into_data()
                .try_into_vec::<f32>()
                .unwrap();
            let mut top = TopK {
                ids: vec![],
                logprobs: vec![],
            };
            for p in 0..e.ids.len() - 1 {
                if e.target[p + 1] {
                    top.ids.push((0..VOCAB as u32).collect());
                    top.logprobs.push(logp[p * VOCAB..(p + 1) * VOCAB].to_vec());
                }
            }
            e.topk = Some(top);
        }
        let (live, a, _) = run(&config(Distill::Live, 0.7, None), Some(&teacher), &train);
        let (stored, b, _) = run(
            &config(Distill::TopK { rest: false }, 0.7, None),
            None,
            &train,
        );
        assert!(
            (a.loss.first_loss - b.loss.first_loss).abs() < 1e-5,
            "{} vs {}",
            a.loss.first_loss,
            b.loss.first_loss
        );
        for (name, x) in &live {
            let d = x
                .iter()
                .zip(&stored[name])
                .map(|(p, q)| (p - q).abs())
                .fold(0.0, f32::max);
            assert!(d < 1e-4, "{name}: {d}");
        }
    }

    #[test]
    fn on_policy_batches_train_on_student_samples() {
        let teacher = model(9, 32, &Device::default());
        let op = OnPolicy {
            fraction: 1.0,
            beta: 0.5,
            temperature: 1.0,
            max_new_tokens: 4,
        };
        let (params, report, log) = run(
            &config(Distill::Live, 0.5, Some(op)),
            Some(&teacher),
            &data(),
        );
        assert_eq!(report.on_policy_batches, 6);
        let rows: Vec<serde_json::Value> = log
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(
            rows.iter()
                .all(|r| r["jsd"].as_f64().unwrap() > 0.0 && r["ce"].is_null())
        );
        let (kd, _, _) = run(&config(Distill::Live, 0.5, None), Some(&teacher), &data());
        assert_ne!(params, kd);
        let missing = train_lm(
            "test",
            model(1, 16, &Device::default().autodiff()),
            None,
            &data(),
            &EvalSet::default(),
            &Vocab {
                tokenizer: &tokenizer(),
                stop_ids: vec![],
                max_len: 32,
            },
            &config(
                Distill::None,
                0.0,
                Some(OnPolicy {
                    fraction: 0.5,
                    beta: 0.5,
                    temperature: 1.0,
                    max_new_tokens: 4,
                }),
            ),
            &mut MetricsLog::create(&tempfile::tempdir().unwrap().path().join("m")).unwrap(),
            None,
            None,
        );
        assert!(matches!(missing, Err(SftError::NeedsTeacher(_))));
    }

    #[test]
    fn resuming_from_a_saved_state_is_bitwise_the_uninterrupted_run() {
        use posttrain_model::params::{param_ids, param_map, with_param_ids, with_params};
        let device = Device::default().autodiff();
        let tok = tokenizer();
        let vocab = Vocab {
            tokenizer: &tok,
            stop_ids: vec![tok.end_of_turn],
            max_len: 32,
        };
        let teacher = model(9, 24, &Device::default());
        let mut cfg = config(
            Distill::Live,
            0.5,
            Some(OnPolicy {
                fraction: 0.5,
                beta: 0.5,
                temperature: 1.0,
                max_new_tokens: 4,
            }),
        );
        cfg.optim.steps = 6;
        let dir = tempfile::tempdir().unwrap();
        let log = |name: &str| MetricsLog::create(&dir.path().join(name)).unwrap();
        let whole = train_lm(
            "test",
            model(1, 16, &device),
            Some(&teacher),
            &data(),
            &EvalSet::default(),
            &vocab,
            &cfg,
            &mut log("a"),
            None,
            None,
        )
        .unwrap()
        .0;
        // the same run, saving its state after step 3
        let optimizer = dir.path().join("optimizer.bpk");
        let mut saved = None;
        let save = |m: &Gemma2ForCausalLM,
                    o: &posttrain_train::Optimizer<Gemma2ForCausalLM>,
                    st: &posttrain_train::LoopState,
                    _: &[(&str, &Gemma2ForCausalLM)]| {
            o.save_state(&optimizer)?;
            if st.step == 3 {
                saved = Some((param_map(m), param_ids(m), st.clone()));
            }
            Ok(())
        };
        train_lm(
            "test",
            model(1, 16, &device),
            Some(&teacher),
            &data(),
            &EvalSet::default(),
            &vocab,
            &cfg,
            &mut log("b"),
            None,
            Some(Saver {
                every: 3,
                save: Box::new(save),
            }),
        )
        .unwrap();
        let (params, ids, state) = saved.expect("a state at step 3");
        // as a new process would: other weights and ids, then the saved ones
        let reloaded = with_param_ids(with_params(model(5, 16, &device), &params), &ids);
        let resumed = train_lm(
            "test",
            reloaded,
            Some(&teacher),
            &data(),
            &EvalSet::default(),
            &vocab,
            &cfg,
            &mut log("c"),
            Some(&Resume {
                state,
                optimizer,
                ranks: 1,
            }),
            None,
        )
        .unwrap()
        .0;
        assert_eq!(named_params(&resumed), named_params(&whole));
    }
}

#[cfg(test)]
mod chunked_tests {
    use super::*;
    use posttrain_datasets::TopK;
    use posttrain_model::LoraConfig;
    use posttrain_model::lora::{Adaptable, TARGETS};
    use posttrain_model::params::{named_grads, param_map, with_params};

    use super::tests::{VOCAB, config};

    /// The shared test model with a final soft-cap, so the chunks cap too.
    fn model(seed: u64, device: &Device) -> Gemma2ForCausalLM {
        let mut m = super::tests::model(seed, 16, device);
        m.final_softcap = Some(5.0);
        m
    }

    /// A LoRA student whose B factors are not zero, so every factor has a gradient.
    fn student(device: &Device) -> Gemma2ForCausalLM {
        let cfg = LoraConfig {
            rank: 2,
            alpha: 4.0,
            targets: TARGETS.iter().map(|t| t.to_string()).collect(),
            dropout: 0.0,
        };
        let m = model(1, device).attach_lora(&cfg, 3);
        let mut p = param_map(&m);
        for (name, t) in p.iter_mut() {
            if name.contains("lora_b") {
                let n = t.shape.iter().product::<usize>();
                let v: Vec<f32> = (0..n).map(|i| ((i % 7) as f32 - 3.0) * 0.03).collect();
                *t = t.with(Tensor::from_data(TensorData::new(v, [n]), device));
            }
        }
        with_params(m, &p)
    }

    /// Completion rows of different lengths with the teacher's top-4 stored.
    fn examples(teacher: &Gemma2ForCausalLM) -> Vec<Example> {
        (0..5u32)
            .map(|i| {
                let (p, c) = (2 + (i % 2) as usize, 2 + (i % 3) as usize);
                let ids: Vec<u32> = (0..p + c)
                    .map(|j| 6 + (i * 5 + j as u32 * 3) % 18)
                    .collect();
                let target: Vec<bool> = (0..ids.len()).map(|j| j >= p).collect();
                let batch = TokenBatch::dense(ids.clone(), 1, ids.len());
                let logp = burn::tensor::activation::log_softmax(teacher.forward(&batch), 2)
                    .into_data()
                    .try_into_vec::<f32>()
                    .unwrap();
                let mut top = TopK {
                    ids: vec![],
                    logprobs: vec![],
                };
                for q in 0..ids.len() - 1 {
                    if target[q + 1] {
                        let row = &logp[q * VOCAB..(q + 1) * VOCAB];
                        let mut order: Vec<u32> = (0..VOCAB as u32).collect();
                        order.sort_by(|a, b| row[*b as usize].total_cmp(&row[*a as usize]));
                        order.truncate(4);
                        top.logprobs
                            .push(order.iter().map(|&j| row[j as usize]).collect());
                        top.ids.push(order);
                    }
                }
                Example {
                    ids,
                    target,
                    topk: Some(top),
                }
            })
            .collect()
    }

    /// The loss, its reported parts and every gradient.
    fn evaluate(
        chunk_rows: Option<usize>,
        cfg: &SftConfig,
        gkd: bool,
    ) -> (Vec<f64>, Vec<Vec<f32>>) {
        // chunked runs also under gradient checkpointing (`--checkpoint-activations`)
        let device = match chunk_rows {
            Some(3) => Device::default().autodiff().gradient_checkpointing(),
            _ => Device::default().autodiff(),
        };
        let teacher = model(9, &Device::default());
        let train = examples(&teacher);
        let refs: Vec<&Example> = train.iter().collect();
        let mut m = student(&device);
        if let Some(rows) = chunk_rows {
            m.head_chunk_elements = rows * VOCAB;
        }
        let (batch, weights) = make_batch(&refs, 0, &device);
        assert_eq!(m.chunks_head(&batch), chunk_rows.is_some());
        let parts = if gkd {
            let op = OnPolicy {
                fraction: 1.0,
                beta: 0.3,
                temperature: 1.0,
                max_new_tokens: 4,
            };
            on_policy_loss(&m, &teacher, &batch, weights, cfg, &op)
        } else {
            data_loss(&m, Some(&teacher), &refs, &batch, weights, cfg)
        };
        let scalar =
            |t: &Option<Tensor<1>>| t.as_ref().map_or(-1.0, |t| t.clone().into_scalar::<f64>());
        let values = vec![
            parts.loss.clone().into_scalar::<f64>(),
            scalar(&parts.ce),
            scalar(&parts.kl),
            scalar(&parts.jsd),
        ];
        let grads = named_grads(&m, &parts.loss.backward());
        assert_eq!(grads.len(), 2 * 2 * 7);
        (values, grads.into_values().map(|g| g.data).collect())
    }

    #[test]
    fn every_sft_loss_through_the_chunked_head_equals_the_whole_logits() {
        let cases = [
            (config(Distill::None, 0.0, None), false),
            (config(Distill::TopK { rest: false }, 0.7, None), false),
            (config(Distill::TopK { rest: true }, 0.7, None), false),
            (config(Distill::Live, 0.5, None), false),
            (config(Distill::None, 0.0, None), true),
        ];
        for (cfg, gkd) in &cases {
            let (want, want_g) = evaluate(None, cfg, *gkd);
            for rows in [1, 3] {
                let (got, got_g) = evaluate(Some(rows), cfg, *gkd);
                // a small KL is a difference of two cross-entropies ~3: its
                // rounding is absolute (~1e-8), not relative to the KL
                for (a, b) in got.iter().zip(&want) {
                    assert!(
                        (a - b).abs() <= 1e-5 * b.abs().max(1e-2),
                        "{:?}: {got:?} vs {want:?}",
                        cfg.distill
                    );
                }
                let largest = |w: &Vec<f32>| w.iter().fold(0f32, |a, x| a.max(x.abs()));
                let global = want_g.iter().map(largest).fold(0f32, f32::max);
                for (g, w) in got_g.iter().zip(&want_g) {
                    assert!(largest(w) > 0.0);
                    // a tensor whose gradient is ~0 next to the others' is
                    // held to the others' scale, not its own rounding noise
                    let scale = largest(w).max(global * 1e-3);
                    for (a, b) in g.iter().zip(w) {
                        assert!(
                            (a - b).abs() <= 1e-5 * scale,
                            "{:?} gkd {gkd}: {a} vs {b} (largest {scale})",
                            cfg.distill
                        );
                    }
                }
            }
        }
    }
}
