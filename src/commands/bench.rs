//! Throughput of a training step and of KV-cached sampling on the shapes of
//! the PyTorch peer benchmark (`tiny`, `small`), one JSON line per case.
//! Definitions follow the peer: training tokens/s = batch·seq / median step
//! time; sampling tokens/s = batch·new / median wall time, prefill included.
//! The RLHF and reward-model steps run the stages' own loops on the peer's
//! shapes (`bench_trl.py`: RLOO 2 prompts × 4 samples × 32 tokens;
//! RewardTrainer 8 pairs × 64 tokens) and report the median of their
//! metrics rows' `step_s` and, for RLHF, its parts.

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use posttrain_datasets::{ChatTokenizer, Prompt};
use posttrain_model::{
    Gemma2Config, Gemma2ForCausalLM, Gemma2ForSequenceClassification, RandomInit, SamplingConfig,
    TokenBatch, generate,
};
use posttrain_reward::{PairIds, RewardConfig, train_reward};
use posttrain_rlhf::{
    Advantage, Anchor, KlEstimator, KlIn, PromptSet, Reward, RlhfConfig, train_rlhf,
};
use posttrain_train::{MetricsLog, OptimConfig, Optimizer, Vocab};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::backend::Env;
use crate::cli::{BenchArgs, BenchCase, BenchShape};

fn shape_config(shape: BenchShape) -> Gemma2Config {
    let mut c = match shape {
        BenchShape::Tiny => Gemma2Config::new(512, 256, 1024, 4, 4, 2, 64, 64),
        BenchShape::Small => Gemma2Config::new(512, 512, 2048, 8, 8, 4, 64, 64),
    };
    c.max_position_embeddings = 512;
    c
}

/// Model FLOPs per token as the peer counts them: 6N (train) or 2N
/// (inference) over matmul weights, plus attention QKᵀ and AV over the
/// average causal context (capped by the window on sliding layers).
fn flops_per_token(c: &Gemma2Config, seq: usize, train: bool) -> f64 {
    let norms = c.hidden_size * (4 * c.num_hidden_layers + 1);
    let n_matmul = (c.num_params() - norms) as f64;
    let mut attn = 0.0;
    for l in 0..c.num_hidden_layers {
        let ctx: usize = (0..seq)
            .map(|q| {
                if c.is_sliding(l) {
                    (q + 1).min(c.sliding_window)
                } else {
                    q + 1
                }
            })
            .sum();
        attn += 4.0 * (ctx as f64 / seq as f64) * (c.num_attention_heads * c.head_dim) as f64;
    }
    if train {
        6.0 * n_matmul + 3.0 * attn
    } else {
        2.0 * n_matmul + attn
    }
}

/// Peak resident set of this process so far (VmHWM), in MB.
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn random_ids(rng: &mut StdRng, n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|_| rng.random_range(3..vocab as u32)).collect()
}

fn bench_train(c: &Gemma2Config, a: &BenchArgs, device: &Device) -> Result<serde_json::Value> {
    let device = device.clone().autodiff();
    let mut model = Gemma2ForCausalLM::new(c, &mut RandomInit::new(0), &device)?;
    // the stages' optimizer with the peer's settings: AdamW, β₂ 0.95,
    // weight decay 0.1, constant lr 3e-4, no clipping
    let mut optim = Optimizer::new(&OptimConfig {
        steps: a.warmup + a.reps,
        lr: 3e-4,
        warmup: 0,
        min_lr_ratio: 1.0,
        weight_decay: 0.1,
        beta1: 0.9,
        beta2: 0.95,
        clip: 0.0,
        accumulation: 1,
    });
    let mut rng = StdRng::seed_from_u64(0);
    let mut times = Vec::new();
    let mut losses = Vec::new();
    for i in 0..a.warmup + a.reps {
        let batch = TokenBatch::dense(
            random_ids(&mut rng, a.batch * a.seq, c.vocab_size),
            a.batch,
            a.seq,
        );
        let t0 = Instant::now();
        let loss = model.causal_lm_loss(&batch);
        let value = loss.clone().into_scalar::<f32>();
        optim.backward(&model, loss);
        model = optim.step(i, model).0;
        if i >= a.warmup {
            times.push(t0.elapsed().as_secs_f64());
            losses.push(value);
        }
    }
    let step = median(times.clone());
    let tps = (a.batch * a.seq) as f64 / step;
    let flops = flops_per_token(c, a.seq, true);
    Ok(json!({
        "bench": "train",
        "batch": a.batch, "seq": a.seq, "steps": a.reps, "warmup": a.warmup,
        "n_params": c.num_params(),
        "tokens_per_s": (tps * 10.0).round() / 10.0,
        "step_s_median": step,
        "step_s_min": times.iter().cloned().fold(f64::INFINITY, f64::min),
        "loss_first": losses.first(), "loss_last": losses.last(),
        "flops_per_token": flops,
        "achieved_gflops": flops * tps / 1e9,
        "peak_rss_mb": peak_rss_mb(),
    }))
}

/// GFLOP/s of an fp32 `n × n · n × n` matmul: (best, median) of `reps`
/// after 3 untimed ones, as the peer's `bench_matmul.py` measures it.
fn matmul_gflops(n: usize, reps: usize, device: &Device) -> (f64, f64) {
    let mut rng = StdRng::seed_from_u64(0);
    let mut random = || {
        let data: Vec<f32> = (0..n * n).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::<2>::from_data(TensorData::new(data, [n, n]), device)
    };
    let (x, y) = (random(), random());
    let mut times = Vec::new();
    for i in 0..3 + reps {
        let t0 = Instant::now();
        x.clone().matmul(y.clone()).into_data();
        if i >= 3 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let flops = 2.0 * (n as f64).powi(3);
    let best = times.iter().cloned().fold(f64::INFINITY, f64::min);
    (flops / best / 1e9, flops / median(times) / 1e9)
}

/// The best rate (GB/s) at which one thread per core sums its share of a
/// 512 MiB f32 buffer.
fn read_bandwidth(reps: usize) -> f64 {
    const N: usize = 1 << 27;
    let data = vec![1.0f32; N];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let part = N.div_ceil(threads);
    let mut best = f64::INFINITY;
    for _ in 0..1 + reps {
        let t0 = Instant::now();
        let sum: f32 = std::thread::scope(|s| {
            let parts: Vec<_> = data
                .chunks(part)
                .map(|c| s.spawn(|| lanes_sum(c)))
                .collect();
            parts
                .into_iter()
                .map(|p| p.join().expect("summing thread"))
                .sum()
        });
        best = best.min(t0.elapsed().as_secs_f64());
        std::hint::black_box(sum);
    }
    (N * size_of::<f32>()) as f64 / best / 1e9
}

/// `Σ x` in 16 independent lanes, so the loop vectorises.
fn lanes_sum(x: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let mut rows = x.chunks_exact(16);
    for row in &mut rows {
        for (lane, v) in lanes.iter_mut().zip(row) {
            *lane += v;
        }
    }
    lanes.iter().sum::<f32>() + rows.remainder().iter().sum::<f32>()
}

fn bench_sample(c: &Gemma2Config, a: &BenchArgs, device: &Device) -> Result<serde_json::Value> {
    let (model, held, weight_bytes) = match &a.model {
        Some(dir) => {
            let held = a.frozen.weights_dtype.resolve(dir, device)?;
            let bytes = super::held_bytes(dir, held)?;
            let (_, model) = posttrain_model::checkpoint::load_causal_lm_frozen(dir, device, held)?;
            (model, held.name(), bytes as usize)
        }
        None => {
            let model = Gemma2ForCausalLM::new(c, &mut RandomInit::new(0), device)?;
            (model, "f32", c.num_params() * size_of::<f32>())
        }
    };
    let mut rng = StdRng::seed_from_u64(0);
    let prompts: Vec<Vec<u32>> = (0..a.batch)
        .map(|_| random_ids(&mut rng, a.prompt, c.vocab_size))
        .collect();
    let sampling = SamplingConfig {
        max_new_tokens: a.new,
        temperature: 1.0,
        ..Default::default()
    };
    let mut times = Vec::new();
    for i in 0..a.warmup + a.reps {
        let t0 = Instant::now();
        let out = generate(&model, &prompts, 0, &sampling, 0);
        assert!(out.iter().all(|o| o.tokens.len() == a.new));
        if i >= a.warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let wall = median(times);
    let len = a.prompt + a.new;
    let flops = flops_per_token(c, len, false) * (a.batch * len) as f64;
    Ok(json!({
        "bench": "generate",
        "batch": a.batch, "prompt": a.prompt, "new": a.new, "reps": a.reps,
        "n_params": c.num_params(),
        "weights_dtype": held,
        "weight_bytes": weight_bytes,
        "tokens_per_s": ((a.batch * a.new) as f64 / wall * 10.0).round() / 10.0,
        "wall_s_median": wall,
        "achieved_gflops": flops / wall / 1e9,
        "peak_rss_mb": peak_rss_mb(),
    }))
}

fn optim(steps: usize) -> OptimConfig {
    // TRL's defaults: lr 1e-4, no weight decay, β₂ 0.999
    OptimConfig {
        steps,
        lr: 1e-4,
        warmup: 0,
        min_lr_ratio: 1.0,
        weight_decay: 0.0,
        beta1: 0.9,
        beta2: 0.999,
        clip: 1.0,
        accumulation: 1,
    }
}

/// Medians of `keys` over the rows after the first `warmup`.
fn row_medians(
    path: &Path,
    warmup: usize,
    keys: &[&str],
) -> Result<serde_json::Map<String, Value>> {
    let text = fs_err::read_to_string(path)?;
    let rows: Vec<Value> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let timed = &rows[warmup.min(rows.len())..];
    let mut out = serde_json::Map::new();
    for &key in keys {
        let v: Vec<f64> = timed.iter().filter_map(|r| r[key].as_f64()).collect();
        if !v.is_empty() {
            out.insert(format!("{key}_median"), median(v).into());
        }
    }
    Ok(out)
}

fn bench_rlhf_step(c: &Gemma2Config, a: &BenchArgs, device: &Device) -> Result<Value> {
    let (items, _) = posttrain_datasets::task::synth(0, 256, 1, 99);
    let mut corpus: Vec<&str> = items
        .iter()
        .flat_map(|i| [i.prompt.as_str(), i.completion.as_str()])
        .collect();
    corpus.push("user\nmodel\n");
    let tokenizer = ChatTokenizer::train(corpus.into_iter(), c.vocab_size)?;
    let prompts: Vec<Prompt> = items
        .iter()
        .map(|i| Prompt::Text(i.prompt.clone()))
        .collect();
    let max_len = c.max_position_embeddings;
    let set = PromptSet::new(&prompts, &tokenizer, max_len, Path::new("bench prompts"))?
        .with_scorer(super::task_scorer);
    let prompt_len_mean = set.ids.iter().map(Vec::len).sum::<usize>() as f64 / set.len() as f64;
    let vocab = Vocab {
        tokenizer: &tokenizer,
        stop_ids: super::stop_ids(c, &tokenizer),
        max_len,
    };
    let policy = Gemma2ForCausalLM::new(c, &mut RandomInit::new(0), &device.clone().autodiff())?;
    let init = policy.valid();
    let steps = a.warmup + a.reps;
    let cfg = RlhfConfig {
        optim: optim(steps),
        prompts_per_step: a.prompts_per_step,
        samples: a.samples,
        temperature: 1.0,
        max_new_tokens: a.rl_new,
        beta: 0.1,
        advantage: Advantage::Rloo,
        kl_estimator: KlEstimator::K1,
        kl_in: KlIn::Reward,
        mu: 0.01,
        anchor: Anchor::Ema,
        length_penalty: 0.0,
        max_kl: None,
        seed: 0,
        batch_size: 64,
        snapshot_every: 0,
    };
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("metrics.jsonl");
    let mut log = MetricsLog::create(&path)?;
    let inputs = posttrain_rlhf::Inputs {
        init: &init,
        reward: &Reward::Scorer,
        prompts: &set,
        vocab: &vocab,
    };
    train_rlhf(
        policy,
        &inputs,
        &cfg,
        &mut log,
        &mut |_, _| Ok(()),
        None,
        None,
    )?;
    let keys = [
        "step_s",
        "rollout_s",
        "reward_s",
        "logprob_s",
        "update_s",
        "length",
    ];
    let mut line = json!({
        "bench": "rlhf_step",
        "prompts_per_step": a.prompts_per_step, "samples": a.samples, "max_new_tokens": a.rl_new,
        "beta": cfg.beta, "anchor": "ema", "reward": "task scorer",
        "prompt_len_mean": prompt_len_mean,
        "steps": a.reps, "warmup": a.warmup,
        "n_params": c.num_params(),
    });
    line.as_object_mut()
        .expect("object")
        .extend(row_medians(&path, a.warmup, &keys)?);
    line["peak_rss_mb"] = peak_rss_mb().into();
    Ok(line)
}

fn bench_reward_step(c: &Gemma2Config, a: &BenchArgs, device: &Device) -> Result<Value> {
    let mut rng = StdRng::seed_from_u64(0);
    let steps = a.warmup + a.reps;
    let (longest, rejected) = (a.pair_len.max(1), a.pair_len.saturating_sub(8).max(1));
    let shortest = a.pair_len.saturating_sub(16).max(1);
    let pairs: Vec<PairIds> = (0..steps * a.pairs)
        .map(|_| {
            let chosen = rng.random_range(shortest..=longest);
            PairIds {
                chosen: random_ids(&mut rng, chosen, c.vocab_size),
                rejected: random_ids(&mut rng, rejected, c.vocab_size),
            }
        })
        .collect();
    let model = Gemma2ForSequenceClassification::new(
        c,
        &mut RandomInit::new(0),
        &device.clone().autodiff(),
    )?;
    let cfg = RewardConfig {
        optim: optim(steps),
        batch_size: a.pairs,
        eval_every: 0,
        seed: 0,
        margin: 0.0,
    };
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("metrics.jsonl");
    let mut log = MetricsLog::create(&path)?;
    train_reward(model, (&pairs, &[]), 0, &cfg, &mut log, None, None)?;
    let mut line = json!({
        "bench": "reward_step",
        "pairs": a.pairs, "pair_len": a.pair_len,
        "chosen_len": [shortest, longest], "rejected_len": rejected,
        "steps": a.reps, "warmup": a.warmup,
        "n_params": c.num_params(),
    });
    line.as_object_mut().expect("object").extend(row_medians(
        &path,
        a.warmup,
        &["step_s", "loss"],
    )?);
    line["peak_rss_mb"] = peak_rss_mb().into();
    Ok(line)
}

/// The matmul peak (measured unless `--peak-gflops`) with where it came from,
/// and the read bandwidth (measured when `sample` or `bandwidth` needs it
/// and `--peak-gbs` is absent); the `matmul` and `bandwidth` cases' lines.
fn peaks(args: &BenchArgs, device: &Device, backend: &str) -> Result<(f64, String, Option<f64>)> {
    const PEAK_N: usize = 2048;
    let wants_matmul = args.case.contains(&BenchCase::Matmul);
    let measured =
        (wants_matmul || args.peak_gflops.is_none()).then(|| matmul_gflops(PEAK_N, 10, device));
    if let (true, Some((best, median))) = (wants_matmul, measured) {
        let line = json!({
            "bench": "matmul", "backend": backend, "n": PEAK_N, "reps": 10,
            "gflops_best": best, "gflops_median": median,
        });
        crate::print_stdout(&format!("{line}\n"))?;
    }
    let (peak, peak_src) = match (args.peak_gflops, measured) {
        (Some(p), _) => (p, "--peak-gflops".to_string()),
        (None, Some((best, _))) => (
            best,
            format!("measured fp32 {PEAK_N}^3 matmul (best of 10, before the cases)"),
        ),
        (None, None) => unreachable!("measured when no peak is given"),
    };
    let wants_bandwidth = args.case.contains(&BenchCase::Bandwidth);
    let measured_gbs = (wants_bandwidth
        || (args.peak_gbs.is_none() && args.case.contains(&BenchCase::Sample)))
    .then(|| read_bandwidth(10));
    if let (true, Some(gbs)) = (wants_bandwidth, measured_gbs) {
        let line = json!({
            "bench": "bandwidth", "bytes": 1usize << 29, "threads": std::thread::available_parallelism().map_or(1, |n| n.get()),
            "reps": 10, "read_gbs_best": gbs,
        });
        crate::print_stdout(&format!("{line}\n"))?;
    }
    Ok((peak, peak_src, args.peak_gbs.or(measured_gbs)))
}

pub fn run(args: BenchArgs, env: &Env) -> Result<()> {
    let (device, backend) = (env.device()?, env.backend());
    let (peak, peak_src, gbs) = peaks(&args, &device, backend)?;
    // a checkpoint is one shape
    let shapes = match &args.model {
        Some(_) => &args.shape[..1],
        None => &args.shape[..],
    };
    for &shape in shapes {
        let config = match &args.model {
            Some(dir) => posttrain_model::load_config(dir)?,
            None => shape_config(shape),
        };
        for &case in &args.case {
            let mut line = match case {
                BenchCase::Train => bench_train(&config, &args, &device)?,
                BenchCase::Sample => bench_sample(&config, &args, &device)?,
                BenchCase::RlhfStep => bench_rlhf_step(&config, &args, &device)?,
                BenchCase::RewardStep => bench_reward_step(&config, &args, &device)?,
                BenchCase::Matmul | BenchCase::Bandwidth => continue,
            };
            if let (BenchCase::Sample, Some(gbs)) = (case, gbs) {
                // every decoding step reads all weights once
                let steps_per_s = gbs * 1e9 / line["weight_bytes"].as_f64().unwrap_or(f64::NAN);
                let bound = steps_per_s * args.batch as f64;
                line["peak_gbs"] = gbs.into();
                line["bandwidth_bound_tokens_per_s"] = bound.round().into();
                line["of_bandwidth_bound"] =
                    (line["tokens_per_s"].as_f64().unwrap_or(f64::NAN) / bound).into();
            }
            line["mfu"] = (line["achieved_gflops"].as_f64().unwrap_or(f64::NAN) / peak).into();
            line["peak_gflops"] = peak.into();
            line["peak_src"] = peak_src.clone().into();
            line["shape"] = match &args.model {
                Some(dir) => dir.display().to_string().into(),
                None => format!("{shape:?}").to_lowercase().into(),
            };
            line["backend"] = backend.into();
            crate::print_stdout(&format!("{line}\n"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::lanes_sum;

    #[test]
    fn lanes_sum_by_hand() {
        let x: Vec<f32> = (1..=35).map(|i| i as f32).collect();
        // 35 · 36 / 2, with a remainder of 3 past two rows of 16
        assert_eq!(lanes_sum(&x), 630.0);
        assert_eq!(lanes_sum(&x[..16]), 136.0);
        assert_eq!(lanes_sum(&[]), 0.0);
    }
}
