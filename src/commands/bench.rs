//! Throughput of a training step and of KV-cached sampling on the shapes of
//! the PyTorch peer benchmark (`tiny`, `small`), one JSON line per case.
//! Definitions follow the peer: training tokens/s = batch·seq / median step
//! time; sampling tokens/s = batch·new / median wall time, prefill included.

use std::time::Instant;

use anyhow::Result;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Tensor, TensorData};
use posttrain_model::{
    Gemma2Config, Gemma2ForCausalLM, RandomInit, SamplingConfig, TokenBatch, generate,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

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
    let mut optim = AdamWConfig::new()
        .with_beta_2(0.95)
        .with_epsilon(1e-8)
        .with_weight_decay(0.1)
        .init();
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
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(3e-4, model, grads);
        let value = loss.into_scalar::<f32>();
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

fn bench_sample(c: &Gemma2Config, a: &BenchArgs, device: &Device) -> Result<serde_json::Value> {
    let model = Gemma2ForCausalLM::new(c, &mut RandomInit::new(0), device)?;
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
        "tokens_per_s": ((a.batch * a.new) as f64 / wall * 10.0).round() / 10.0,
        "wall_s_median": wall,
        "achieved_gflops": flops / wall / 1e9,
        "peak_rss_mb": peak_rss_mb(),
    }))
}

pub fn run(args: BenchArgs, env: &Env) -> Result<()> {
    let (device, backend) = (env.device()?, env.backend());
    const PEAK_N: usize = 2048;
    let wants_matmul = args.case.contains(&BenchCase::Matmul);
    let measured =
        (wants_matmul || args.peak_gflops.is_none()).then(|| matmul_gflops(PEAK_N, 10, &device));
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
    for &shape in &args.shape {
        let config = shape_config(shape);
        for &case in &args.case {
            let mut line = match case {
                BenchCase::Train => bench_train(&config, &args, &device)?,
                BenchCase::Sample => bench_sample(&config, &args, &device)?,
                BenchCase::Matmul => continue,
            };
            line["mfu"] = (line["achieved_gflops"].as_f64().unwrap_or(f64::NAN) / peak).into();
            line["peak_gflops"] = peak.into();
            line["peak_src"] = peak_src.clone().into();
            line["shape"] = format!("{shape:?}").to_lowercase().into();
            line["backend"] = backend.into();
            crate::print_stdout(&format!("{line}\n"))?;
        }
    }
    Ok(())
}
