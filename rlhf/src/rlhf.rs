//! The RLHF stage (WARP stage 1) in the shared loop: each step samples K
//! completions for a batch of prompts from the policy, scores them with the
//! reward model, shapes the reward with the KL to the anchor, takes one
//! REINFORCE step with leave-one-out advantages, and moves the EMA anchor
//! towards the policy. Rollout, reward scoring, reference log-probs and update are timed apart.

use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use posttrain_datasets::Example;
use posttrain_model::params::{ParamMap, param_map, trainable_param_map, with_params};
use posttrain_model::{Gemma2ForCausalLM, SamplingConfig};
use posttrain_train::logprobs::{
    SequenceLogprobs, batch_of, per_example, shared_prompt_logprobs, shared_sequence_logprobs,
};
use posttrain_train::rollout::{PromptSet, Rollouts, roll_out_share};
use posttrain_train::{
    At, Draw, LoopError, MetricsLog, OptimConfig, Resume, Run, Saver, Schedule, Share, Stage, Step,
    StepLog, Vocab, train,
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
    step: Option<StepParts>,
}

/// A step's samples with what the update needs of them, and its timings.
struct StepParts {
    rollouts: Rollouts,
    /// Each sample's completion tokens.
    lengths: Vec<usize>,
    rewards: Vec<f64>,
    /// The task scorer's (score, correct) of every sample, when it has one.
    true_scores: Option<Vec<(f64, bool)>>,
    /// Completion log-prob sums under the anchor and the init.
    anchor_lp: Vec<f64>,
    init_lp: Vec<f64>,
    /// Per-token anchor log-probs, when the estimator or the loss needs them.
    anchor_tokens: Option<Vec<Vec<f64>>>,
    rollout_s: f64,
    reward_s: f64,
    logprob_s: f64,
    /// When the policy's forward/backward began (the update is timed to
    /// the end of the anchor's move).
    update_start: Instant,
    update_s: f64,
}

impl Stage<Gemma2ForCausalLM> for RlhfStage<'_> {
    type Report = RlhfReport;
    type Error = RlhfError;
    const MEANS: &'static [&'static str] = &["entropy"];
    const VALUES: &'static [&'static str] = &[
        "reward",
        "length",
        "shaped",
        "kl_anchor",
        "kl_init",
        "score",
        "correct",
    ];

    fn name(&self) -> &str {
        "rlhf"
    }

    fn blame(&self) -> &'static str {
        "reward model"
    }

    fn units_per_row(&self) -> Option<usize> {
        Some(self.cfg.samples)
    }

    /// Rollouts of this rank's prompts, their rewards, and the anchor's and
    /// the init's log-probs.
    fn prepare(
        &mut self,
        step: usize,
        draw: Draw<'_>,
        policy: &Gemma2ForCausalLM,
    ) -> Result<(), RlhfError> {
        let (cfg, vocab, prompts) = (self.cfg, self.vocab, self.prompts);
        let pad = vocab.tokenizer.pad;
        // rollouts: K samples per prompt
        let t = Instant::now();
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
            draw.all,
            draw.share,
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
        // (per token too, from the same pass, when the estimator or the loss needs them)
        let per_token = cfg.kl_estimator != KlEstimator::K1 || cfg.kl_in == KlIn::Loss;
        // (each prompt once, its K samples continuing from its keys and values)
        let (anchor_lp, anchor_tokens) = shared_prompt_logprobs(
            &self.anchor,
            &rollouts.examples,
            pad,
            cfg.batch_size,
            per_token,
        );
        let init_lp = match cfg.anchor {
            Anchor::Sft => anchor_lp.clone(),
            Anchor::Ema => {
                let examples = &rollouts.examples;
                shared_prompt_logprobs(&self.init, examples, pad, cfg.batch_size, false).0
            }
        };
        let logprob_s = t.elapsed().as_secs_f64();
        self.step = Some(StepParts {
            true_scores: rollouts.true_scores(prompts),
            lengths: rollouts.lengths(),
            rollouts,
            rewards,
            anchor_lp,
            init_lp,
            anchor_tokens,
            rollout_s,
            reward_s,
            logprob_s,
            update_start: Instant::now(),
            update_s: 0.0,
        });
        Ok(())
    }

    /// Shaped rewards, advantages and the policy gradient of whole prompt
    /// groups.
    fn loss(
        &mut self,
        _at: At,
        rows: &[usize],
        policy: &Gemma2ForCausalLM,
    ) -> Result<Share, RlhfError> {
        let (cfg, pad) = (self.cfg, self.vocab.tokenizer.pad);
        let p = self.step.as_ref().expect("prepared");
        let (at, n) = (rows[0], rows.len());
        let chunk = &p.rollouts.examples[at..at + n];
        let lengths = &p.lengths[at..at + n];
        let reward_beta = if cfg.kl_in == KlIn::Reward {
            cfg.beta
        } else {
            0.0
        };
        let (batch, weights) = batch_of(chunk, pad, &self.device);
        // each prompt once, its K samples continuing from its keys and values
        let SequenceLogprobs {
            sums,
            tokens,
            entropy,
        } = shared_sequence_logprobs(policy, chunk, pad, (&batch, weights.clone()), true);
        let lp = sums.clone().inner().into_data().try_into_vec_as::<f64>();
        // the KL that shapes the reward: k1 from the sums, else per token
        let estimated = p
            .anchor_tokens
            .as_ref()
            .map(|a| estimate_kl(cfg.kl_estimator, chunk, &tokens, &a[at..], batch.len));
        let (mut kl_anchor, mut kl_init, mut shaped) = (Vec::new(), Vec::new(), Vec::new());
        for (j, lp) in lp.expect("float sums").iter().enumerate() {
            let i = at + j;
            let kl = lp - p.anchor_lp[i];
            kl_anchor.push(kl);
            kl_init.push(lp - p.init_lp[i]);
            let penalty = estimated.as_ref().map_or(kl, |e| e[j]);
            shaped.push(shaped_reward(
                p.rewards[i],
                penalty,
                reward_beta,
                cfg.length_penalty,
                lengths[j],
            ));
        }
        let advantages = cfg.advantage.of(&shaped, cfg.samples);
        let mut loss: Tensor<1> = policy_gradient_loss(sums, &advantages);
        if cfg.kl_in == KlIn::Loss {
            let anchor = &p.anchor_tokens.as_ref().expect("computed for the loss")[at..];
            let reference = positioned(chunk, anchor, batch.len, &self.device);
            let k = cfg.kl_estimator.on(tokens, reference).mul(weights);
            loss = loss.add(k.sum_dim(1).mean().reshape([1]).mul_scalar(cfg.beta));
        }
        let scores = p.true_scores.as_ref().map(|s| &s[at..at + n]);
        let of =
            |f: fn(&(f64, bool)) -> f64| scores.map_or(Vec::new(), |s| s.iter().map(f).collect());
        let values = vec![
            p.rewards[at..at + n].to_vec(),
            lengths.iter().map(|&l| l as f64).collect(),
            shaped,
            kl_anchor,
            kl_init,
            of(|s| s.0),
            of(|s| f64::from(u8::from(s.1))),
        ];
        let completion_tokens = lengths.iter().sum::<usize>() as u64;
        Ok(Share {
            means: vec![Some(entropy.expect("asked for"))],
            values,
            ..Share::new(loss, n as f64, completion_tokens)
        })
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

    fn metrics(
        &mut self,
        s: &Step<'_>,
        report: &mut Run<RlhfReport>,
    ) -> Result<StepLog, RlhfError> {
        let p = self.step.take().expect("a step was taken");
        let step = s.step;
        let lengths = s.values("length");
        let step_tokens = s.tokens;
        report.tokens += step_tokens;
        let reward = mean(s.values("reward"));
        let mut row = json!({
            "step": step + 1,
            "reward": reward,
            "shaped_reward": mean(s.values("shaped")),
            "kl_anchor": mean(s.values("kl_anchor")),
            "kl_init": mean(s.values("kl_init")),
            "length": step_tokens as f64 / lengths.len().max(1) as f64,
            "entropy": s.mean("entropy").unwrap_or(0.0),
            "loss": s.loss,
            "lr": s.optim.lr,
            "grad_norm": s.optim.grad_norm,
            "samples": lengths.len(),
            "tokens": report.tokens,
            "rollout_s": p.rollout_s,
            "reward_s": p.reward_s,
            "logprob_s": p.logprob_s,
            "update_s": p.update_s,
            "rollout_tokens_per_s": step_tokens as f64 / p.rollout_s.max(1e-9),
            "epoch": s.epoch,
        });
        let scores = s.values("score");
        let true_score = (!scores.is_empty() && scores.len() == lengths.len()).then(|| {
            let score = mean(scores);
            row["score"] = score.into();
            row["accuracy"] = mean(s.values("correct")).into();
            score
        });
        if step == 0 {
            report.first_reward = reward;
            report.first_score = true_score;
        }
        report.steps = step + 1;
        report.last_reward = reward;
        report.last_score = true_score;
        report.last_kl_init = mean(s.values("kl_init"));
        report.last_kl_anchor = mean(s.values("kl_anchor"));
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
        if every > 0 && done.is_multiple_of(every) && done < self.cfg.optim.steps {
            (self.snapshot)(done, policy).map_err(RlhfError::Snapshot)?;
        }
        Ok(())
    }

    fn extra(&self) -> Vec<(&str, &Gemma2ForCausalLM)> {
        vec![("anchor", &self.anchor)]
    }
}

/// What an RLHF run reads besides the policy it trains.
pub struct Inputs<'a> {
    /// The SFT policy the run starts from (the KL's reference).
    pub init: &'a Gemma2ForCausalLM,
    pub reward: &'a Reward<'a>,
    pub prompts: &'a PromptSet,
    pub vocab: &'a Vocab<'a>,
}

/// Trains `policy` (on an autodiff device) from `init` (the SFT policy);
/// returns the policy and the final anchor. `snapshot(step, policy)` is
/// called every `snapshot_every` steps before the last. With `resume` (and the
/// anchor saved with it) it continues a saved run; `saver` stores the state
/// (the anchor as `anchor`) every N steps.
pub fn train_rlhf(
    policy: Gemma2ForCausalLM,
    inputs: &Inputs<'_>,
    cfg: &RlhfConfig,
    log: &mut MetricsLog,
    snapshot: &mut dyn FnMut(usize, &Gemma2ForCausalLM) -> Result<(), String>,
    resume: Option<(&Resume, ParamMap)>,
    saver: Option<Saver<Gemma2ForCausalLM>>,
) -> Result<(Gemma2ForCausalLM, Gemma2ForCausalLM, Run<RlhfReport>), RlhfError> {
    let Inputs {
        init,
        reward,
        prompts,
        vocab,
    } = *inputs;
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
        step: None,
    };
    let lengths = prompts.ids.iter().map(Vec::len).collect();
    let schedule = Schedule::new(&cfg.optim, (lengths, cfg.prompts_per_step), 0, cfg.seed);
    let resume = resume.as_ref().map(|(r, _)| *r);
    let (policy, report) = train(&mut stage, policy, schedule, log, resume, saver)?;
    Ok((policy, stage.anchor, report))
}
