//! The RLHF loop (WARP stage 1), one flat loop: each step samples K
//! completions for a batch of prompts from the policy, scores them with the
//! reward model, shapes the reward with the KL to the anchor, takes one
//! REINFORCE step with leave-one-out advantages, and moves the EMA anchor
//! towards the policy. Rollout, reward scoring, reference log-probs and update are timed apart.

use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use posttrain_datasets::{Epochs, Example};
use posttrain_model::params::{ParamMap, param_map, trainable_param_map, with_params};
use posttrain_model::{Gemma2ForCausalLM, SamplingConfig};
use posttrain_train::logprobs::{
    SequenceLogprobs, batch_of, logprob_sums, per_example, sequence_logprobs, token_logprobs,
};
use posttrain_train::rollout::{PromptSet, gather_true_scores, roll_out_share};
use posttrain_train::{
    Backward, LoopError, LoopState, LossSummary, MetricsLog, OptimConfig, Report, Resume, Saver,
    Schedule, Stage, StepLog, StepStats, Vocab, train,
};
use posttrain_warp::{WarpError, ema};
use serde_json::json;

use crate::grpo::Advantage;
use crate::kl_estimators::{KlEstimator, KlIn};
use crate::rloo::{policy_gradient_loss, shaped_reward};
use crate::rollout::Reward;

/// What the KL term pulls towards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Anchor {
    /// `θ_ema ← (1 − μ)θ_ema + μθ` after every step (WARP).
    Ema,
    /// The fixed SFT initialisation (classic RLHF).
    Sft,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RlhfConfig {
    pub optim: OptimConfig,
    /// Prompts per optimizer step (each sampled `samples` times).
    pub prompts_per_step: usize,
    /// K: samples per prompt.
    pub samples: usize,
    pub temperature: f32,
    pub max_new_tokens: usize,
    /// β: weight of the KL to the anchor.
    pub beta: f64,
    /// The baseline of the policy gradient.
    pub advantage: Advantage,
    /// How the KL to the anchor is estimated per token, and where it enters.
    pub kl_estimator: KlEstimator,
    pub kl_in: KlIn,
    /// μ: EMA update rate of the anchor.
    pub mu: f64,
    pub anchor: Anchor,
    /// Subtracted from the reward per completion token.
    pub length_penalty: f64,
    /// Stop once the mean KL to the SFT init exceeds this.
    pub max_kl: Option<f64>,
    pub seed: u64,
    /// Sequences per forward pass when scoring without gradients.
    pub batch_size: usize,
    /// Hand the policy to the snapshot callback every N steps (0: never).
    pub snapshot_every: usize,
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RlhfReport {
    pub steps: usize,
    /// First and last policy-gradient loss.
    #[serde(flatten)]
    pub loss: LossSummary,
    /// Completion tokens sampled.
    pub tokens: u64,
    /// Mean RM reward of the first and last steps' samples.
    pub first_reward: f64,
    pub last_reward: f64,
    pub last_kl_init: f64,
    pub last_kl_anchor: f64,
    /// True task score of the first and last steps' samples.
    pub first_score: Option<f64>,
    pub last_score: Option<f64>,
    /// The step at which the KL bound stopped the run.
    pub stopped_at_kl: Option<usize>,
    /// Seconds sampling, scoring with the reward, computing the anchor's
    /// and init's log-probs, and in the policy's forward/backward/step + EMA.
    pub rollout_s: f64,
    pub reward_s: f64,
    pub logprob_s: f64,
    pub update_s: f64,
    pub seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum RlhfError {
    #[error(transparent)]
    Loop(#[from] LoopError),
    #[error(transparent)]
    Data(#[from] posttrain_datasets::DataError),
    #[error(transparent)]
    Warp(#[from] WarpError),
    #[error("no prompts")]
    NoPrompts,
    #[error("{0}")]
    Config(String),
    #[error("writing a snapshot: {0}")]
    Snapshot(String),
}

impl RlhfConfig {
    /// Refuses settings that cannot run (named by their flags).
    pub fn check(&self) -> Result<(), RlhfError> {
        let refuse = |m: String| Err(RlhfError::Config(m));
        if self.prompts_per_step == 0 {
            return refuse("--prompts-per-step must be positive".into());
        }
        if self.samples < 2 {
            return refuse(format!(
                "--samples must be at least 2 (the baseline leaves one sample out), got {}",
                self.samples
            ));
        }
        if !(self.beta >= 0.0 && self.beta.is_finite()) {
            return refuse(format!(
                "--beta must be a non-negative number, got {}",
                self.beta
            ));
        }
        if !(0.0..=1.0).contains(&self.mu) {
            return refuse(format!("--mu must be in [0, 1], got {}", self.mu));
        }
        if self.temperature.is_nan() || self.temperature <= 0.0 {
            return refuse(format!(
                "--temperature must be positive, got {}",
                self.temperature
            ));
        }
        if self.max_kl.is_some_and(|k| k.is_nan() || k <= 0.0) {
            return refuse("--max-kl must be positive".into());
        }
        Ok(())
    }
}

/// Per-example values placed at their sampled tokens' positions in a batch
/// of `examples` padded to `t`, `[n, t − 1]` (0 elsewhere).
fn positioned(examples: &[Example], values: &[Vec<f64>], t: usize, device: &Device) -> Tensor<2> {
    let mut out = vec![0f32; examples.len() * (t - 1)];
    for (r, (e, v)) in examples.iter().zip(values).enumerate() {
        let at = (0..e.ids.len() - 1).filter(|&p| e.target[p + 1]);
        for (p, x) in at.zip(v) {
            out[r * (t - 1) + p] = *x as f32;
        }
    }
    Tensor::from_data(TensorData::new(out, [examples.len(), t - 1]), device)
}

/// Each sequence's KL estimate `Σ_t k(t)` from the policy's per-position
/// log-probs `tokens` `[n, t − 1]` and the anchor's per-example ones.
fn estimate_kl(
    estimator: KlEstimator,
    examples: &[Example],
    tokens: &Tensor<2>,
    anchor: &[Vec<f64>],
    t: usize,
) -> Vec<f64> {
    let values = tokens.clone().inner().into_data().try_into_vec_as::<f64>();
    let own = per_example(examples, &values.expect("float"), t);
    own.iter()
        .zip(anchor)
        .map(|(o, a)| o.iter().zip(a).map(|(x, y)| estimator.at(*x, *y)).sum())
        .collect()
}

/// The seed of step `step`'s rollouts.
fn step_seed(seed: u64, step: usize) -> u64 {
    seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ (step as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// RLHF in the shared loop.
struct RlhfStage<'a> {
    init: Gemma2ForCausalLM,
    anchor: Gemma2ForCausalLM,
    reward: &'a Reward<'a>,
    prompts: &'a PromptSet,
    vocab: &'a Vocab<'a>,
    cfg: &'a RlhfConfig,
    snapshot: &'a mut dyn FnMut(usize, &Gemma2ForCausalLM) -> Result<(), String>,
    device: Device,
    data: Epochs,
    report: RlhfReport,
    step: Option<StepParts>,
}

/// What one step measured before the optimizer step.
struct StepParts {
    rewards: Vec<f64>,
    samples: usize,
    /// The task scorer's (score, correct) of every sample, when it has one.
    true_scores: Option<Vec<(f64, bool)>>,
    lengths: Vec<usize>,
    shaped: Vec<f64>,
    kl_anchor: Vec<f64>,
    kl_init: Vec<f64>,
    entropy_sum: f64,
    chunks: usize,
    rollout_s: f64,
    reward_s: f64,
    logprob_s: f64,
    /// When the policy's forward/backward began (the update is timed to
    /// the end of the anchor's move).
    update_start: Instant,
    update_s: f64,
}

impl Report for RlhfReport {
    fn loss_summary(&mut self) -> &mut LossSummary {
        &mut self.loss
    }

    fn set_seconds(&mut self, seconds: f64) {
        self.seconds = seconds;
    }
}

impl Stage<Gemma2ForCausalLM> for RlhfStage<'_> {
    type Report = RlhfReport;
    type Error = RlhfError;

    fn name(&self) -> &str {
        "rlhf"
    }

    fn blame(&self) -> &'static str {
        "reward model"
    }

    fn report(&mut self) -> &mut RlhfReport {
        &mut self.report
    }

    fn restore(&mut self, report: RlhfReport, state: &LoopState) -> Result<(), RlhfError> {
        self.report = report;
        self.data.seek(state.epoch, state.next);
        Ok(())
    }

    fn forward_backward(
        &mut self,
        step: usize,
        policy: &Gemma2ForCausalLM,
        backward: &mut Backward<'_, Gemma2ForCausalLM>,
    ) -> Result<u64, RlhfError> {
        let (cfg, vocab, prompts) = (self.cfg, self.vocab, self.prompts);
        let pad = vocab.tokenizer.pad;
        // rollouts: K samples per prompt
        let t = Instant::now();
        let world = posttrain_train::dist::world();
        let indices = self.data.next_batch();
        // this rank's whole prompt groups (all of them in one process)
        let share = world.share(indices.len());
        let sampling = SamplingConfig {
            max_new_tokens: cfg.max_new_tokens,
            temperature: cfg.temperature,
            seed: step_seed(cfg.seed, step),
            stop_ids: vocab.stop_ids.clone(),
            ..SamplingConfig::default()
        };
        let rollouts = roll_out_share(
            &policy.valid(),
            prompts,
            &indices,
            share.clone(),
            cfg.samples,
            &sampling,
            vocab,
        );
        let rollout_s = t.elapsed().as_secs_f64();

        // their rewards
        let t = Instant::now();
        let rewards = self.reward.rewards(prompts, &rollouts)?;
        let reward_s = t.elapsed().as_secs_f64();

        // log-probs under the anchor and the init
        let t = Instant::now();
        let lengths = rollouts.lengths();
        let anchor_lp = logprob_sums(&self.anchor, &rollouts.examples, pad, cfg.batch_size);
        let init_lp = match cfg.anchor {
            Anchor::Sft => anchor_lp.clone(),
            Anchor::Ema => logprob_sums(&self.init, &rollouts.examples, pad, cfg.batch_size),
        };
        let logprob_s = t.elapsed().as_secs_f64();

        // per-token anchor log-probs, when the estimator or the loss needs them
        let per_token = cfg.kl_estimator != KlEstimator::K1 || cfg.kl_in == KlIn::Loss;
        let anchor_tokens = per_token
            .then(|| token_logprobs(&self.anchor, &rollouts.examples, pad, cfg.batch_size));
        let reward_beta = if cfg.kl_in == KlIn::Reward {
            cfg.beta
        } else {
            0.0
        };

        // shaped rewards, advantages and the policy gradient, whole prompt
        // groups per micro-batch
        let update_start = Instant::now();
        let (mut kl_anchor, mut kl_init, mut shaped) = (Vec::new(), Vec::new(), Vec::new());
        let mut entropy_sum = 0.0;
        let micro = cfg.optim.accumulation.max(1);
        let per_chunk = cfg.samples * share.len().div_ceil(micro).max(1);
        let chunks: Vec<&[Example]> = rollouts.examples.chunks(per_chunk).collect();
        // every rank takes part in as many micro-batches as the others
        let rounds = if world.size() == 1 {
            chunks.len()
        } else {
            micro
        };
        for c in 0..rounds {
            let Some(&chunk) = chunks.get(c) else {
                backward.empty_share()?;
                backward.combine(&mut [0.0]);
                continue;
            };
            let at = c * per_chunk;
            let (batch, weights) = batch_of(chunk, pad, &self.device);
            let SequenceLogprobs {
                sums,
                tokens,
                entropy,
            } = sequence_logprobs(policy, &batch, weights.clone(), true);
            let entropy = entropy.expect("asked for");
            let lp = sums
                .clone()
                .inner()
                .into_data()
                .try_into_vec_as::<f64>()
                .expect("float sums");
            // the KL that shapes the reward: k1 from the sums, else per token
            let estimated = anchor_tokens
                .as_ref()
                .map(|a| estimate_kl(cfg.kl_estimator, chunk, &tokens, &a[at..], batch.len));
            let mut chunk_shaped = Vec::with_capacity(chunk.len());
            for (j, lp) in lp.iter().enumerate() {
                let i = at + j;
                let kl = lp - anchor_lp[i];
                kl_anchor.push(kl);
                kl_init.push(lp - init_lp[i]);
                let penalty = estimated.as_ref().map_or(kl, |e| e[j]);
                chunk_shaped.push(shaped_reward(
                    rewards[i],
                    penalty,
                    reward_beta,
                    cfg.length_penalty,
                    lengths[i],
                ));
            }
            let advantages = cfg.advantage.of(&chunk_shaped, cfg.samples);
            shaped.extend(chunk_shaped);
            let mut loss: Tensor<1> = policy_gradient_loss(sums, &advantages);
            if cfg.kl_in == KlIn::Loss {
                let anchor = &anchor_tokens.as_ref().expect("computed for the loss")[at..];
                let reference = positioned(chunk, anchor, batch.len, &self.device);
                let k = cfg.kl_estimator.on(tokens, reference).mul(weights);
                loss = loss.add(k.sum_dim(1).mean().reshape([1]).mul_scalar(cfg.beta));
            }
            backward.backward_share(policy, loss, chunk.len() as f64)?;
            let mut entropy = [entropy];
            backward.combine(&mut entropy);
            entropy_sum += entropy[0];
        }
        // every rank's samples, for the metrics and the KL stop
        let true_scores = rollouts.true_scores(prompts);
        let gather = |v: &[f64]| world.all_gather_f64(v);
        let lengths = world.all_gather_usize(&lengths);
        let true_scores = gather_true_scores(true_scores);
        let tokens = lengths.iter().sum::<usize>() as u64;
        self.step = Some(StepParts {
            chunks: rounds,
            samples: lengths.len(),
            true_scores,
            rewards: gather(&rewards),
            lengths,
            shaped: gather(&shaped),
            kl_anchor: gather(&kl_anchor),
            kl_init: gather(&kl_init),
            entropy_sum,
            rollout_s,
            reward_s,
            logprob_s,
            update_start,
            update_s: 0.0,
        });
        Ok(tokens)
    }

    fn after_update(&mut self, policy: &Gemma2ForCausalLM) -> Result<(), RlhfError> {
        if self.cfg.anchor == Anchor::Ema {
            // only what trains moves: a LoRA policy's frozen base stays shared
            let trained = trainable_param_map(policy);
            let mut anchor = param_map(&self.anchor);
            anchor.retain(|name, _| trained.contains_key(name));
            let moved = ema(&anchor, &trained, self.cfg.mu)?;
            self.anchor = with_params(self.anchor.clone(), &moved);
        }
        if let Some(p) = self.step.as_mut() {
            p.update_s = p.update_start.elapsed().as_secs_f64();
        }
        Ok(())
    }

    fn metrics(&mut self, step: usize, loss: f64, stats: &StepStats) -> Result<StepLog, RlhfError> {
        let p = self.step.take().expect("a step was taken");
        let report = &mut self.report;
        let step_tokens: usize = p.lengths.iter().sum();
        report.tokens += step_tokens as u64;
        let reward = mean(&p.rewards);
        let mut row = json!({
            "step": step + 1,
            "reward": reward,
            "shaped_reward": mean(&p.shaped),
            "kl_anchor": mean(&p.kl_anchor),
            "kl_init": mean(&p.kl_init),
            "length": step_tokens as f64 / p.lengths.len().max(1) as f64,
            "entropy": p.entropy_sum / p.chunks as f64,
            "loss": loss,
            "lr": stats.lr,
            "grad_norm": stats.grad_norm,
            "samples": p.samples,
            "tokens": report.tokens,
            "rollout_s": p.rollout_s,
            "reward_s": p.reward_s,
            "logprob_s": p.logprob_s,
            "update_s": p.update_s,
            "rollout_tokens_per_s": step_tokens as f64 / p.rollout_s.max(1e-9),
            "epoch": self.data.epoch,
        });
        let true_score = p.true_scores.as_ref().map(|s| {
            let score = s.iter().map(|x| x.0).sum::<f64>() / s.len() as f64;
            let accuracy = s.iter().filter(|x| x.1).count() as f64 / s.len() as f64;
            row["score"] = score.into();
            row["accuracy"] = accuracy.into();
            score
        });
        if step == 0 {
            report.first_reward = reward;
            report.first_score = true_score;
        }
        report.steps = step + 1;
        report.last_reward = reward;
        report.last_score = true_score;
        report.last_kl_init = mean(&p.kl_init);
        report.last_kl_anchor = mean(&p.kl_anchor);
        report.rollout_s += p.rollout_s;
        report.reward_s += p.reward_s;
        report.logprob_s += p.logprob_s;
        report.update_s += p.update_s;
        let steps = self.cfg.optim.steps;
        let line = ((step + 1).is_multiple_of((steps / 10).max(1)) || step + 1 == steps).then(|| {
            let score = true_score.map_or(String::new(), |s| format!(", score {s:.3}"));
            format!(
                "rlhf: step {}: reward {reward:.3}{score}, kl to init {:.3}, to anchor {:.3}, length {:.1}",
                step + 1,
                report.last_kl_init,
                report.last_kl_anchor,
                row["length"].as_f64().unwrap_or(0.0),
            )
        });
        let stop = match self.cfg.max_kl {
            Some(bound) if report.last_kl_init > bound => {
                report.stopped_at_kl = Some(step + 1);
                Some(format!(
                    "rlhf: KL to init {:.3} > bound {bound} at step {}: stopping",
                    report.last_kl_init,
                    step + 1
                ))
            }
            _ => None,
        };
        Ok(StepLog {
            line,
            stop,
            ..StepLog::of(row)
        })
    }

    fn after_log(&mut self, done: usize, policy: &Gemma2ForCausalLM) -> Result<(), RlhfError> {
        let every = self.cfg.snapshot_every;
        let root = posttrain_train::dist::world().is_root();
        if root && every > 0 && done.is_multiple_of(every) && done < self.cfg.optim.steps {
            (self.snapshot)(done, policy).map_err(RlhfError::Snapshot)?;
        }
        Ok(())
    }

    fn position(&self) -> (u64, usize) {
        (self.data.epoch, self.data.next)
    }

    fn extra(&self) -> Vec<(&str, &Gemma2ForCausalLM)> {
        vec![("anchor", &self.anchor)]
    }
}

/// Trains `policy` (on an autodiff device) from `init` (the SFT policy);
/// returns the policy and the final anchor. `snapshot(step, policy)` is
/// called every `snapshot_every` steps before the last. With `resume` (and the
/// anchor saved with it) it continues a saved run; `saver` stores the state
/// (the anchor as `anchor`) every N steps.
#[allow(clippy::too_many_arguments)]
pub fn train_rlhf(
    policy: Gemma2ForCausalLM,
    init: &Gemma2ForCausalLM,
    reward: &Reward,
    prompts: &PromptSet,
    vocab: &Vocab,
    cfg: &RlhfConfig,
    log: &mut MetricsLog,
    snapshot: &mut dyn FnMut(usize, &Gemma2ForCausalLM) -> Result<(), String>,
    resume: Option<(&Resume, ParamMap)>,
    saver: Option<Saver<Gemma2ForCausalLM>>,
) -> Result<(Gemma2ForCausalLM, Gemma2ForCausalLM, RlhfReport), RlhfError> {
    if prompts.is_empty() {
        return Err(RlhfError::NoPrompts);
    }
    cfg.check()?;
    let init = init.valid();
    let anchor = match &resume {
        Some((_, saved)) => with_params(init.clone(), saved),
        None => init.clone(),
    };
    let mut stage = RlhfStage {
        init,
        anchor,
        reward,
        prompts,
        vocab,
        cfg,
        snapshot,
        device: policy.model.embed_tokens.weight.device(),
        data: Epochs::new(
            prompts.ids.iter().map(Vec::len).collect(),
            cfg.prompts_per_step,
            cfg.seed,
        ),
        report: RlhfReport::default(),
        step: None,
    };
    let schedule = Schedule {
        optim: &cfg.optim,
        eval_every: 0,
        seed: cfg.seed,
    };
    let resume = resume.as_ref().map(|(r, _)| *r);
    let policy = train(&mut stage, policy, schedule, log, resume, saver)?;
    Ok((policy, stage.anchor, stage.report))
}
