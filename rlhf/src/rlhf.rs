//! The RLHF loop (WARP stage 1), one flat loop: each step samples K
//! completions for a batch of prompts from the policy, scores them with the
//! reward model, shapes the reward with the KL to the anchor, takes one
//! REINFORCE step with leave-one-out advantages, and moves the EMA anchor
//! towards the policy. Rollout, reward scoring, reference log-probs and update are timed apart.

use std::time::Instant;

use burn::module::Module;
use burn::tensor::Tensor;
use posttrain_datasets::Epochs;
use posttrain_model::params::{ParamMap, param_map, with_params};
use posttrain_model::{Gemma2ForCausalLM, SamplingConfig};
use posttrain_sft::Vocab;
use posttrain_train::{MetricsLog, OptimConfig, Optimizer, Progress, Resume, Saver};
use posttrain_warp::{WarpError, ema};
use serde_json::json;

use crate::rloo::{policy_gradient_loss, rloo_advantages, shaped_reward};
use crate::rollout::{
    PromptSet, Reward, batch_of, logprob_sums, mean_entropy, roll_out, sequence_logprobs,
};

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
    /// β: weight of the KL to the anchor in the shaped reward.
    pub beta: f64,
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
    pub save_every: usize,
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
    pub seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum RlhfError {
    #[error("loss is not finite ({loss}) at step {step}: lower --lr or check the reward model")]
    NotFinite { step: usize, loss: f64 },
    #[error("writing metrics: {0}")]
    Io(#[from] std::io::Error),
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
    #[error("resumable state: {0}")]
    State(String),
}

/// The seed of step `step`'s rollouts.
fn step_seed(seed: u64, step: usize) -> u64 {
    seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ (step as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Trains `policy` (on an autodiff device) from `init` (the SFT policy);
/// returns the policy and the final anchor. `snapshot(step, policy)` is
/// called every `save_every` steps before the last. With `resume` (and the
/// anchor saved with it) it continues a saved run; `saver` stores the state
/// (the anchor as `anchor`) every N steps.
#[allow(clippy::too_many_arguments)]
pub fn train_rlhf(
    mut policy: Gemma2ForCausalLM,
    init: &Gemma2ForCausalLM,
    reward: &Reward,
    prompts: &PromptSet,
    vocab: &Vocab,
    cfg: &RlhfConfig,
    log: &mut MetricsLog,
    snapshot: &mut dyn FnMut(usize, &Gemma2ForCausalLM) -> Result<(), String>,
    resume: Option<(&Resume, ParamMap)>,
    mut saver: Option<Saver<Gemma2ForCausalLM>>,
) -> Result<(Gemma2ForCausalLM, Gemma2ForCausalLM, RlhfReport), RlhfError> {
    if prompts.is_empty() {
        return Err(RlhfError::NoPrompts);
    }
    if cfg.samples < 2 {
        return Err(RlhfError::Config(format!(
            "--samples must be at least 2 for the leave-one-out baseline, got {}",
            cfg.samples
        )));
    }
    let device = policy.model.embed_tokens.weight.device();
    let pad = vocab.tokenizer.pad;
    let init = init.valid();
    let mut anchor = init.clone();
    let mut optim = Optimizer::new(&cfg.optim);
    let mut data = Epochs::new(
        prompts.ids.iter().map(Vec::len).collect(),
        cfg.prompts_per_step,
        cfg.seed,
    );
    let micro = cfg.optim.accumulation.max(1);
    let mut progress = Progress::new("rlhf", cfg.optim.steps as u64, "steps");
    let start = Instant::now();
    let mut report = RlhfReport::default();
    let mut first_step = 0;
    if let Some((r, saved_anchor)) = resume {
        report = r.restore(&mut optim).map_err(RlhfError::State)?;
        data.seek(r.state.epoch, r.state.next);
        anchor = with_params(anchor, &saved_anchor);
        first_step = r.state.step;
        progress.advance(first_step as u64, 0);
    }

    for step in first_step..cfg.optim.steps {
        let t = Instant::now();
        let indices = data.next_batch();
        let sampling = SamplingConfig {
            max_new_tokens: cfg.max_new_tokens,
            temperature: cfg.temperature,
            seed: step_seed(cfg.seed, step),
            stop_ids: vocab.stop_ids.clone(),
            ..SamplingConfig::default()
        };
        let rollouts = roll_out(
            &policy.valid(),
            prompts,
            &indices,
            cfg.samples,
            &sampling,
            vocab.tokenizer,
            vocab.max_len,
        );
        let rollout_s = t.elapsed().as_secs_f64();

        let t = Instant::now();
        let rewards = reward.rewards(prompts, &rollouts)?;
        let reward_s = t.elapsed().as_secs_f64();

        let t = Instant::now();
        let lengths = rollouts.lengths();
        let anchor_lp = logprob_sums(&anchor, &rollouts.examples, pad, cfg.batch_size);
        let init_lp = match cfg.anchor {
            Anchor::Sft => anchor_lp.clone(),
            Anchor::Ema => logprob_sums(&init, &rollouts.examples, pad, cfg.batch_size),
        };
        let logprob_s = t.elapsed().as_secs_f64();

        let t = Instant::now();
        let (mut kl_anchor, mut kl_init, mut shaped) = (Vec::new(), Vec::new(), Vec::new());
        let (mut loss_sum, mut entropy_sum) = (0.0, 0.0);
        let per_chunk = cfg.samples * indices.len().div_ceil(micro);
        for (c, chunk) in rollouts.examples.chunks(per_chunk).enumerate() {
            let at = c * per_chunk;
            let (batch, weights) = batch_of(chunk, pad, &device);
            let (sums, logits) = sequence_logprobs(&policy, &batch, weights.clone());
            entropy_sum += mean_entropy(logits, weights);
            let lp = sums
                .clone()
                .inner()
                .into_data()
                .try_into_vec_as::<f64>()
                .expect("float sums");
            let mut chunk_shaped = Vec::with_capacity(chunk.len());
            for (j, lp) in lp.iter().enumerate() {
                let i = at + j;
                let kl = lp - anchor_lp[i];
                kl_anchor.push(kl);
                kl_init.push(lp - init_lp[i]);
                chunk_shaped.push(shaped_reward(
                    rewards[i],
                    kl,
                    cfg.beta,
                    cfg.length_penalty,
                    lengths[i],
                ));
            }
            let advantages = rloo_advantages(&chunk_shaped, cfg.samples);
            shaped.extend(chunk_shaped);
            let loss: Tensor<1> = policy_gradient_loss(sums, &advantages);
            let value = loss.clone().into_scalar::<f64>();
            if !value.is_finite() {
                return Err(RlhfError::NotFinite {
                    step: step + 1,
                    loss: value,
                });
            }
            loss_sum += value;
            optim.backward(&policy, loss);
        }
        let chunks = rollouts.examples.len().div_ceil(per_chunk);
        let (next, stats) = optim.step(step, policy);
        policy = next;
        if cfg.anchor == Anchor::Ema {
            let moved = ema(&param_map(&anchor), &param_map(&policy), cfg.mu)?;
            anchor = with_params(anchor, &moved);
        }
        let update_s = t.elapsed().as_secs_f64();

        let step_tokens: usize = lengths.iter().sum();
        report.tokens += step_tokens as u64;
        let reward = mean(&rewards);
        let mut row = json!({
            "step": step + 1,
            "reward": reward,
            "shaped_reward": mean(&shaped),
            "kl_anchor": mean(&kl_anchor),
            "kl_init": mean(&kl_init),
            "length": step_tokens as f64 / lengths.len().max(1) as f64,
            "entropy": entropy_sum / chunks as f64,
            "loss": loss_sum / chunks as f64,
            "lr": stats.lr,
            "grad_norm": stats.grad_norm,
            "samples": rollouts.len(),
            "tokens": report.tokens,
            "rollout_s": rollout_s,
            "reward_s": reward_s,
            "logprob_s": logprob_s,
            "update_s": update_s,
            "rollout_tokens_per_s": step_tokens as f64 / rollout_s.max(1e-9),
            "epoch": data.epoch,
        });
        let true_score = rollouts.true_scores(prompts).map(|s| {
            let score = s.iter().map(|x| x.0).sum::<f64>() / s.len() as f64;
            let accuracy = s.iter().filter(|x| x.1).count() as f64 / s.len() as f64;
            row["score"] = score.into();
            row["accuracy"] = accuracy.into();
            score
        });
        log.log(&row)?;
        if step == 0 {
            report.first_reward = reward;
            report.first_score = true_score;
        }
        report.steps = step + 1;
        report.last_reward = reward;
        report.last_score = true_score;
        report.last_kl_init = mean(&kl_init);
        report.last_kl_anchor = mean(&kl_anchor);
        report.rollout_s += rollout_s;
        report.reward_s += reward_s;
        report.logprob_s += logprob_s;
        report.update_s += update_s;
        let every = (cfg.optim.steps / 10).max(1);
        if (step + 1) % every == 0 || step + 1 == cfg.optim.steps {
            let score = true_score.map_or(String::new(), |s| format!(", score {s:.3}"));
            progress.println(&format!(
                "rlhf: step {}: reward {reward:.3}{score}, kl to init {:.3}, to anchor {:.3}, length {:.1}",
                step + 1,
                report.last_kl_init,
                report.last_kl_anchor,
                row["length"].as_f64().unwrap_or(0.0),
            ));
        }
        progress.advance(1, step_tokens as u64);
        if cfg.save_every > 0 && (step + 1) % cfg.save_every == 0 && step + 1 < cfg.optim.steps {
            snapshot(step + 1, &policy).map_err(RlhfError::Snapshot)?;
        }
        if let Some(s) = saver.as_mut() {
            let position = (data.epoch, data.next);
            s.after_step(
                step + 1,
                cfg.optim.steps,
                position,
                &report,
                &policy,
                &optim,
                &[("anchor", &anchor)],
            )
            .map_err(RlhfError::State)?;
        }
        if let Some(bound) = cfg.max_kl
            && report.last_kl_init > bound
        {
            progress.println(&format!(
                "rlhf: KL to init {:.3} > bound {bound} at step {}: stopping",
                report.last_kl_init,
                step + 1
            ));
            report.stopped_at_kl = Some(step + 1);
            break;
        }
    }
    progress.finish();
    report.seconds = start.elapsed().as_secs_f64();
    Ok((policy, anchor, report))
}
