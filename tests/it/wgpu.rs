//! Every stage on `--backend wgpu` against `flex` on the same inputs:
//! per-step losses within 1e-3 relative, merges within 1e-5, generated,
//! scored and evaluated tables within 1e-3, samples equal (greedy, and
//! seeded with both backends drawing on the device). Built with
//! `--features wgpu` (no autotune: on software Vulkan it benchmarks
//! candidate kernels for minutes per shape); `.ci/run` runs it on lavapipe.

use std::path::{Path, PathBuf};

use crate::pipeline::Micro;
use crate::{ok, relative_difference, s};

const BACKENDS: [&str; 2] = ["flex", "wgpu"];

/// `args` (with `{out}` for the output) on both backends, into
/// `flex/NAME` and `wgpu/NAME`.
fn both(m: &Micro, name: &str, args: &[&str]) -> [PathBuf; 2] {
    BACKENDS.map(|backend| {
        let dir = m.path(backend);
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join(name);
        let mut a: Vec<&str> = args
            .iter()
            .map(|&x| if x == "{out}" { s(&out) } else { x })
            .collect();
        // both draw samples on the device, so seeded samples are the same tokens
        a.extend(["--backend", backend, "--sample-on", "device"]);
        ok(&a);
        out
    })
}

fn rows(file: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(file).unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Every logged step's loss within 1e-3 of the run's loss scale.
fn losses_close(stage: &str, [flex, wgpu]: &[PathBuf; 2]) {
    let loss = |dir: &Path| -> Vec<f64> {
        rows(&dir.join("metrics.jsonl"))
            .iter()
            .filter_map(|r| r["loss"].as_f64())
            .collect()
    };
    let (a, b) = (loss(flex), loss(wgpu));
    assert!(!a.is_empty() && a.len() == b.len(), "{stage}: {a:?} {b:?}");
    // near-zero losses (a policy-gradient loss) are compared on a scale of 1
    let scale = a.iter().map(|x| x.abs()).fold(1.0, f64::max);
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / scale)
        .fold(0.0, f64::max);
    eprintln!(
        "{stage}: {} steps, largest loss difference {worst:.2e} of the run's scale",
        a.len()
    );
    assert!(worst < 1e-3, "{stage}: flex {a:?}\nwgpu {b:?}");
}

fn weights_close(what: &str, [flex, wgpu]: &[PathBuf; 2], file: &str, tolerance: f64) {
    let (worst, _) = relative_difference(&flex.join(file), &wgpu.join(file));
    eprintln!("{what}: largest relative weight difference {worst:.2e}");
    assert!(worst < tolerance, "{what}: {worst:e}");
}

/// The same rows and keys, and numbers that agree to `tolerance`
/// relative (text equal).
fn tables_close(what: &str, [flex, wgpu]: &[PathBuf; 2], tolerance: f64) {
    let (a, b) = (rows(flex), rows(wgpu));
    assert_eq!(a.len(), b.len(), "{what}");
    for (x, y) in a.iter().zip(&b) {
        values_close(what, x, y, tolerance);
    }
}

fn values_close(what: &str, x: &serde_json::Value, y: &serde_json::Value, tolerance: f64) {
    use serde_json::Value;
    match (x, y) {
        (Value::Number(p), Value::Number(q)) => {
            let (p, q) = (p.as_f64().unwrap(), q.as_f64().unwrap());
            let scale = p.abs().max(q.abs()).max(1.0);
            assert!((p - q).abs() <= tolerance * scale, "{what}: {p} vs {q}");
        }
        (Value::Object(p), Value::Object(q)) => {
            let keys = |o: &serde_json::Map<String, Value>| o.keys().cloned().collect::<Vec<_>>();
            assert_eq!(keys(p), keys(q), "{what}");
            for (k, v) in p {
                // where a row names its own file, the two runs differ by design
                if k != "checkpoint" && k != "path" {
                    values_close(what, v, &q[k], tolerance);
                }
            }
        }
        (Value::Array(p), Value::Array(q)) => {
            assert_eq!(p.len(), q.len(), "{what}");
            for (v, w) in p.iter().zip(q) {
                values_close(what, v, w, tolerance);
            }
        }
        _ => assert_eq!(x, y, "{what}"),
    }
}

#[test]
fn every_stage_runs_on_wgpu_as_on_flex() {
    let m = Micro::new("200", "8", "200");
    let train = m.task.join("train.jsonl");
    let prompts = m.task.join("train_prompts.jsonl");
    let eval_prompts = m.task.join("eval_prompts.jsonl");
    let short = ["--steps", "6", "--batch-size", "8", "--eval-every", "0"];

    let mut pretrain = m.pretrain_args(&train, Path::new("{out}"), &["--steps", "6"]);
    pretrain.extend(["--batch-size", "8", "--eval-every", "0"]);
    let runs = both(&m, "pretrain", &pretrain);
    losses_close("pretrain", &runs);
    let policy = m.policy();
    let policy = s(&policy);

    // greedy generation with the teacher's top-k: the same tokens, close log-probs
    let generated = both(
        &m,
        "generated.jsonl",
        &[
            "generate",
            "--model",
            policy,
            "--prompts",
            s(&prompts),
            "--out",
            "{out}",
            "--topk",
            "4",
            "--temperature",
            "0",
            "--max-new-tokens",
            "12",
        ],
    );
    tables_close("generate", &generated, 1e-3);
    let pairs = s(&generated[0]);

    // a student other than the model that wrote the pairs, so there is something to learn
    let barely = m.path("flex/pretrain");
    let sft = [
        &[
            "sft",
            "--model",
            s(&barely),
            "--data",
            pairs,
            "--out",
            "{out}",
        ][..],
        &short,
    ]
    .concat();
    losses_close(
        "sft --kd topk",
        &both(&m, "sft", &[&sft[..], &["--kd", "topk"]].concat()),
    );
    let lora = [&sft[..], &["--lora-rank", "4", "--lr", "1e-2"]].concat();
    losses_close("sft --lora-rank 4", &both(&m, "sft-lora", &lora));
    let student = m.path("flex/sft");
    let student = s(&student);

    let prefs = m.prefs(Path::new(policy));
    let prefs = s(&prefs);
    let reward = [
        &[
            "reward", "--policy", policy, "--data", prefs, "--out", "{out}",
        ][..],
        &short,
    ]
    .concat();
    let rm = both(&m, "rm", &[&reward[..], &["--size-ratio", "2"]].concat());
    losses_close("reward", &rm);
    let init = [&reward[..], &["--init", policy, "--lora-rank", "4"]].concat();
    losses_close("reward --init --lora-rank 4", &both(&m, "rm-lora", &init));
    let rm = s(&rm[0]);

    for stage in ["dpo", "orpo"] {
        let args = [
            &[stage, "--policy", policy, "--data", prefs, "--out", "{out}"][..],
            &short,
        ];
        losses_close(stage, &both(&m, stage, &args.concat()));
    }

    let rlhf = [
        "rlhf",
        "--policy",
        policy,
        "--reward",
        rm,
        "--prompts",
        s(&prompts),
        "--out",
        "{out}",
        "--steps",
        "4",
        "--prompts-per-step",
        "4",
        "--samples",
        "4",
        "--max-new-tokens",
        "12",
        "--anchor",
        "ema",
        "--snapshot-every",
        "2",
    ];
    losses_close("rlhf", &both(&m, "rlhf", &rlhf));
    let rl = m.path("flex/rlhf");
    let rl = s(&rl);

    let merged = both(
        &m,
        "merge",
        &[
            "warp",
            "merge",
            "--init",
            policy,
            "--policies",
            rl,
            student,
            "--eta",
            "0.3",
            "--out",
            "{out}",
        ],
    );
    weights_close("warp merge", &merged, "model.safetensors", 1e-5);
    let ema = [
        "warp", "ema", "--anchor", policy, "--policy", rl, "--mu", "0.1", "--out", "{out}",
    ];
    weights_close(
        "warp ema",
        &both(&m, "ema", &ema),
        "model.safetensors",
        1e-5,
    );
    let average = [
        "warp", "average", "--models", policy, rl, student, "--out", "{out}",
    ];
    weights_close(
        "warp average",
        &both(&m, "average", &average),
        "model.safetensors",
        1e-5,
    );

    let scored = ["score", "--reward", rm, "--input", pairs, "--out", "{out}"];
    tables_close("score", &both(&m, "scored.jsonl", &scored), 1e-3);
    let eval = [
        "eval",
        "--checkpoints",
        policy,
        student,
        "--prompts",
        s(&eval_prompts),
        "--reward",
        rm,
        "--samples",
        "2",
        "--max-new-tokens",
        "12",
        "--out",
        "{out}",
    ];
    tables_close("eval", &both(&m, "eval.jsonl", &eval), 1e-3);
    let sample = |file: &str, how: &[&str]| {
        let args = [
            &[
                "sample",
                "--model",
                student,
                "--prompts",
                s(&eval_prompts),
                "--max-new-tokens",
                "12",
                "--out",
                "{out}",
            ][..],
            how,
        ]
        .concat();
        both(&m, file, &args)
    };
    let sampled = sample("sampled.jsonl", &["--temperature", "0"]);
    assert_eq!(
        std::fs::read(&sampled[0]).unwrap(),
        std::fs::read(&sampled[1]).unwrap(),
        "greedy samples differ"
    );
    let how = ["--temperature", "1", "--top-k", "20", "--top-p", "0.9"];
    let sampled = sample("seeded.jsonl", &how);
    assert_eq!(
        std::fs::read(&sampled[0]).unwrap(),
        std::fs::read(&sampled[1]).unwrap(),
        "seeded samples differ"
    );
}

/// A weight larger than the largest buffer wgpu binds (a Gemma-2 2B's f32
/// embedding is 2.36 GB) is refused in one line before anything is
/// allocated, and no output is left behind; it used to panic inside CubeCL.
#[test]
fn a_weight_over_the_binding_limit_is_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = crate::fixture();
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture.join("config.json")).unwrap()).unwrap();
    // 2^24 + 1 rows of 64: 4 GiB + 256 B, over any 32-bit binding limit
    config["vocab_size"] = (1u64 << 24 | 1).into();
    let file = dir.path().join("config.json");
    std::fs::write(&file, config.to_string()).unwrap();
    let out = dir.path().join("big");
    let tokenizer = fixture.join("tokenizer.json");
    let args = [
        "init",
        "--config",
        s(&file),
        "--tokenizer",
        s(&tokenizer),
        "--out",
        s(&out),
        "--backend",
        "wgpu",
    ];
    crate::fails(
        &args,
        &[
            "tensor model.embed_tokens.weight: [16777217, 64] in f32 is 4294967552 bytes",
            "--backend flex",
        ],
    );
    assert!(!out.exists());
}
