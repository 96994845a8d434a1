//! LoRA runs: PEFT adapter directories out, loss that falls, adapters that
//! load everywhere a checkpoint does, merged by `convert`.

use std::path::Path;

use crate::checkpoints::read_f32;
use crate::pipeline::{Micro, metrics};
use crate::{error_line, ok, s};

fn sft_lora(m: &Micro, policy: &Path, out: &Path, steps: &str, rank: &str, extra: &[&str]) {
    let data = m.task.join("train.jsonl");
    let eval = m.task.join("eval.jsonl");
    let mut args = vec![
        "sft",
        "--model",
        s(policy),
        "--data",
        s(&data),
        "--eval",
        s(&eval),
        "--out",
        s(out),
        "--steps",
        steps,
        "--batch-size",
        "16",
        "--lr",
        "3e-3",
        "--warmup",
        "3",
        "--eval-every",
        "20",
        "--eval-samples",
        "0",
        "--lora-rank",
        rank,
        "--lora-alpha",
        "16",
    ];
    args.extend_from_slice(extra);
    ok(&args);
}

fn tensor_names(file: &Path) -> Vec<String> {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    names
}

#[test]
fn sft_with_lora_writes_a_peft_adapter_that_learns_and_merges() {
    let m = Micro::new("200", "24", "200");
    let policy = m.policy();
    let out = m.path("sft-lora");
    sft_lora(
        &m,
        &policy,
        &out,
        "60",
        "8",
        &["--lora-targets", "q,v,down"],
    );
    assert!(!out.join("model.safetensors").exists());
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["task_type"], "CAUSAL_LM");
    assert_eq!(config["r"], 8);
    assert_eq!(config["lora_alpha"], 16.0);
    assert_eq!(
        config["target_modules"],
        serde_json::json!(["q_proj", "v_proj", "down_proj"])
    );
    let base = std::path::PathBuf::from(config["base_model_name_or_path"].as_str().unwrap());
    assert_eq!(base.canonicalize().unwrap(), policy.canonicalize().unwrap());
    // one layer × three projections × two factors, under PEFT's names
    let adapter = out.join("adapter_model.safetensors");
    assert_eq!(
        tensor_names(&adapter),
        [
            "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight",
            "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
            "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight",
        ]
    );
    let provenance: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("posttrain.json")).unwrap()).unwrap();
    assert_eq!(
        provenance["lora"]["base"]["sha256"],
        provenance["parents"][0]["sha256"]
    );
    // the held-out loss falls with only the adapters trained
    let evals: Vec<f64> = metrics(&out)
        .iter()
        .filter_map(|r| r["eval_loss"].as_f64())
        .collect();
    assert_eq!(evals.len(), 3);
    assert!(evals[2] < evals[0] - 0.02, "{evals:?}");

    // convert on the adapter directory writes the merged model:
    // W + (α/r)·B·A for the adapted projections, the base elsewhere
    let merged = m.path("merged");
    ok(&["convert", "--model", s(&out), "--out", s(&merged)]);
    let w = |dir: &Path, n: &str| read_f32(&dir.join("model.safetensors"), n);
    let name = "model.layers.0.self_attn.q_proj";
    let (shape, base_w) = w(&policy, &format!("{name}.weight"));
    let (_, merged_w) = w(&merged, &format!("{name}.weight"));
    let (a_shape, a) = read_f32(&adapter, &format!("base_model.model.{name}.lora_A.weight"));
    let (_, b) = read_f32(&adapter, &format!("base_model.model.{name}.lora_B.weight"));
    let (rows, cols, r) = (shape[0], shape[1], a_shape[0]);
    assert!(b.iter().any(|v| *v != 0.0), "B has moved from zero");
    for i in 0..rows {
        for j in 0..cols {
            let delta: f32 = (0..r).map(|k| b[i * r + k] * a[k * cols + j]).sum();
            let want = base_w[i * cols + j] + 2.0 * delta;
            let got = merged_w[i * cols + j];
            assert!((got - want).abs() < 1e-5, "[{i},{j}] {got} vs {want}");
        }
    }
    for untouched in [
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.embed_tokens.weight",
    ] {
        assert_eq!(w(&merged, untouched), w(&policy, untouched), "{untouched}");
    }
    // an adapter directory is a checkpoint to every reading command
    let samples = m.path("samples.jsonl");
    let prompts = m.task.join("eval_prompts.jsonl");
    let sample = |model: &Path, out: &Path| {
        ok(&[
            "sample",
            "--model",
            s(model),
            "--prompts",
            s(&prompts),
            "--out",
            s(out),
            "--max-new-tokens",
            "8",
            "--temperature",
            "0",
        ]);
        std::fs::read(out).unwrap()
    };
    let from_merged = m.path("samples-merged.jsonl");
    assert_eq!(sample(&out, &samples), sample(&merged, &from_merged));
    // on a bf16 base the adapter is read compact (bf16 matrices, f32
    // products) and samples as the same weights read into f32 do
    let base16 = m.path("policy-bf16");
    ok(&[
        "convert",
        "--model",
        s(&policy),
        "--out",
        s(&base16),
        "--dtype",
        "bf16",
    ]);
    let on16 = m.path("sft-lora-bf16");
    sft_lora(&m, &base16, &on16, "20", "8", &[]);
    // trained on the bf16 base held compact (the default), the adapter is
    // the one trained on the same weights widened to f32
    let on32 = m.path("sft-lora-bf16-as-f32");
    sft_lora(&m, &base16, &on32, "20", "8", &["--base-dtype", "f32"]);
    let factors = |dir: &Path| crate::safetensors_f32(&dir.join("adapter_model.safetensors"));
    let (a16, a32) = (factors(&on16), factors(&on32));
    assert_eq!(a16.len(), a32.len());
    for ((name, x), (_, y)) in a16.iter().zip(&a32) {
        let scale = y.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
        let worst = x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(worst / scale < 1e-4, "{name}: {worst} of {scale}");
    }
    let compact = sample(&on16, &m.path("compact.jsonl"));
    let f32_out = m.path("f32.jsonl");
    ok(&[
        "sample",
        "--model",
        s(&on16),
        "--prompts",
        s(&prompts),
        "--out",
        s(&f32_out),
        "--max-new-tokens",
        "8",
        "--temperature",
        "0",
        "--weights-dtype",
        "f32",
    ]);
    assert_eq!(compact, std::fs::read(&f32_out).unwrap());
}

#[test]
fn reward_with_lora_trains_the_score_head_and_the_adapters() {
    let m = Micro::new("200", "8", "200");
    let policy = m.policy();
    let prefs = m.prefs(&policy);
    let out = m.path("rm-lora");
    ok(&[
        "reward",
        "--policy",
        s(&policy),
        "--init",
        s(&policy),
        "--data",
        s(&prefs),
        "--out",
        s(&out),
        "--steps",
        "40",
        "--batch-size",
        "8",
        "--eval-every",
        "0",
        "--lora-rank",
        "4",
    ]);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["task_type"], "SEQ_CLS");
    assert_eq!(config["modules_to_save"], serde_json::json!(["score"]));
    let names = tensor_names(&out.join("adapter_model.safetensors"));
    assert!(names.contains(&"base_model.model.score.weight".to_string()));
    assert_eq!(names.len(), 1 + 7 * 2, "{names:?}");
    let log = metrics(&out);
    let mean = |rows: &[serde_json::Value]| {
        rows.iter()
            .map(|r| r["loss"].as_f64().unwrap())
            .sum::<f64>()
            / rows.len() as f64
    };
    assert!(mean(&log[30..]) < mean(&log[..10]), "the loss falls");
    // the adapter scores like a checkpoint: it ranks its training pairs
    let summary = ok(&["score", "--reward", s(&out), "--pairs", s(&prefs)]);
    let summary: serde_json::Value = serde_json::from_str(summary.trim()).unwrap();
    assert!(summary["accuracy"].as_f64().unwrap() > 0.55, "{summary}");
}

#[test]
fn lora_settings_and_adapters_that_cannot_work_are_refused_in_one_line() {
    let m = Micro::new("40", "8", "200");
    let policy = m.policy();
    let data = m.task.join("train.jsonl");
    let base = |extra: &[&str], out: &Path| {
        let mut args = vec![
            "sft",
            "--model",
            s(&policy),
            "--data",
            s(&data),
            "--out",
            s(out),
            "--steps",
            "2",
            "--eval-every",
            "0",
        ];
        args.extend_from_slice(extra);
        args.iter().map(|a| a.to_string()).collect::<Vec<_>>()
    };
    let run = |extra: &[&str], needles: &[&str]| {
        let out = m.path("refused");
        let args = base(extra, &out);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        error_line(&args, needles);
        assert!(!out.exists());
    };
    run(
        &["--lora-rank", "4", "--lora-targets", "q,emb"],
        &["--lora-targets", "emb_proj"],
    );
    run(
        &["--lora-rank", "4", "--lora-alpha", "0"],
        &["--lora-alpha"],
    );
    run(&["--lora-rank", "0"], &["--lora-rank must be positive"]);
    error_line(
        &[
            "pretrain",
            "--config",
            s(&m.config),
            "--tokenizer",
            s(&m.tokenizer),
            "--data",
            s(&data),
            "--out",
            s(&m.path("p")),
            "--lora-rank",
            "4",
        ],
        &["--lora-rank"],
    );
    // an adapter whose base has gone, and one with a tensor of another shape
    let adapter = m.path("adapter");
    sft_lora(&m, &policy, &adapter, "2", "8", &[]);
    let moved = m.path("moved-adapter");
    std::fs::create_dir_all(&moved).unwrap();
    for f in std::fs::read_dir(&adapter).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), moved.join(f.file_name())).unwrap();
    }
    let cfg = moved.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(s(&policy.canonicalize().unwrap()), "/nonexistent/base");
    std::fs::write(&cfg, text).unwrap();
    let convert = |from: &Path| {
        error_line(
            &["convert", "--model", s(from), "--out", s(&m.path("c"))],
            &["adapter_config.json"],
        )
    };
    let line = convert(&moved);
    assert!(line.contains("/nonexistent/base"), "{line}");
    let big = m.path("rank16");
    sft_lora(&m, &policy, &big, "2", "16", &[]);
    std::fs::copy(
        big.join("adapter_model.safetensors"),
        adapter.join("adapter_model.safetensors"),
    )
    .unwrap();
    let line = error_line(
        &["convert", "--model", s(&adapter), "--out", s(&m.path("c"))],
        &["adapter_model.safetensors", "lora_A", "r = 8"],
    );
    assert!(line.contains("shape"), "{line}");
}

#[test]
fn rlhf_with_lora_keeps_an_adapter_anchor_and_warp_merges_the_merged_deltas() {
    let m = Micro::new("200", "8", "200");
    let policy = m.policy();
    let prompts = m.task.join("train_prompts.jsonl");
    let rlhf = |seed: &str| {
        let out = m.path(&format!("rl-{seed}"));
        let anchor = m.path(&format!("anchor-{seed}"));
        ok(&[
            "rlhf",
            "--policy",
            s(&policy),
            "--task-reward",
            "--prompts",
            s(&prompts),
            "--out",
            s(&out),
            "--anchor-out",
            s(&anchor),
            "--steps",
            "20",
            "--prompts-per-step",
            "8",
            "--max-new-tokens",
            "12",
            "--lr",
            "3e-3",
            "--seed",
            seed,
            "--lora-rank",
            "4",
        ]);
        (out, anchor)
    };
    let (a, anchor) = rlhf("1");
    let (b, _) = rlhf("2");
    // the EMA anchor is an adapter on the same base, between init and policy
    let name = "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight";
    let (_, policy_b) = read_f32(&a.join("adapter_model.safetensors"), name);
    let (_, anchor_b) = read_f32(&anchor.join("adapter_model.safetensors"), name);
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!(norm(&anchor_b) > 0.0 && norm(&anchor_b) < norm(&policy_b));
    // WARP's merge of adapters on --init runs in factor space and writes an
    // adapter of rank 2·4; it equals the merge of the same policies as full
    // checkpoints
    let merge = |policies: &[&Path], out: &Path| {
        let mut args = vec!["warp", "merge", "--init", s(&policy), "--policies"];
        args.extend(policies.iter().map(|p| s(p)));
        args.extend(["--eta", "0.3,1.0", "--out", s(out)]);
        ok(&args);
    };
    let merged = m.path("merged");
    merge(&[&a, &b], &merged);
    let config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(merged.join("eta-0.30/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["r"], 8);
    let full = |dir: &Path| {
        let out = m.path(&format!(
            "{}-full",
            dir.file_name().unwrap().to_str().unwrap()
        ));
        ok(&["convert", "--model", s(dir), "--out", s(&out)]);
        out
    };
    let (fa, fb) = (full(&a), full(&b));
    let dense = m.path("dense");
    merge(&[&fa, &fb], &dense);
    let angles = |dir: &Path| {
        let p: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("posttrain.json")).unwrap()).unwrap();
        p["params"]["angles_degrees"][0].clone()
    };
    for eta in ["eta-0.30", "eta-1.00"] {
        let (low, dense) = (merged.join(eta), dense.join(eta));
        let (la, da) = (angles(&low), angles(&dense));
        for (group, deg) in da.as_object().unwrap() {
            let (x, y) = (la[group].as_f64().unwrap_or(0.0), deg.as_f64().unwrap());
            assert!((x - y).abs() < 0.05, "{group}: {x}° vs {y}°");
        }
        let low = full(&low);
        let w = |dir: &Path, n: &str| read_f32(&dir.join("model.safetensors"), n).1;
        for name in [
            "model.layers.0.mlp.up_proj.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.embed_tokens.weight",
            "model.layers.0.input_layernorm.weight",
        ] {
            let (x, y) = (w(&low, name), w(&dense, name));
            assert!(
                x.iter()
                    .zip(&y)
                    .all(|(p, q)| (p - q).abs() <= 1e-5 * (1.0 + q.abs())),
                "{eta} {name}"
            );
        }
        assert_ne!(
            w(&low, "model.layers.0.mlp.up_proj.weight"),
            w(&policy, "model.layers.0.mlp.up_proj.weight")
        );
    }
    // an adapter on another base is refused
    let other = m.path("other-base");
    ok(&["convert", "--model", s(&policy), "--out", s(&other)]);
    let line = error_line(
        &[
            "warp",
            "merge",
            "--init",
            s(&other),
            "--policies",
            s(&a),
            s(&b),
            "--out",
            s(&m.path("refused")),
        ],
        &["rl-1", "not on --init"],
    );
    assert!(!m.path("refused").exists(), "{line}");
}

#[test]
fn checkpointed_activations_train_the_same_weights() {
    let m = Micro::new("200", "8", "200");
    let policy = m.policy();
    let data = m.task.join("train.jsonl");
    let run = |name: &str, extra: &[&str]| {
        let out = m.path(name);
        let mut args = vec![
            "sft",
            "--model",
            s(&policy),
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--steps",
            "10",
            "--batch-size",
            "8",
            "--eval-every",
            "0",
        ];
        args.extend_from_slice(extra);
        ok(&args);
        out
    };
    let weights = |dir: &Path, file: &str| std::fs::read(dir.join(file)).unwrap();
    let (plain, checkpointed) = (
        run("plain", &[]),
        run("checkpointed", &["--checkpoint-activations"]),
    );
    assert_eq!(
        weights(&plain, "model.safetensors"),
        weights(&checkpointed, "model.safetensors")
    );
    let lora = ["--lora-rank", "4", "--checkpoint-activations"];
    let (plain, checkpointed) = (run("lora", &lora[..2]), run("lora-checkpointed", &lora));
    assert_eq!(
        weights(&plain, "adapter_model.safetensors"),
        weights(&checkpointed, "adapter_model.safetensors")
    );
    // LoRA dropout: seeded per step, so reproducible, and not a no-op
    let dropout = ["--lora-rank", "4", "--lora-dropout", "0.3"];
    let (a, b) = (run("dropout-a", &dropout), run("dropout-b", &dropout));
    assert_eq!(
        weights(&a, "adapter_model.safetensors"),
        weights(&b, "adapter_model.safetensors")
    );
    assert_ne!(
        weights(&a, "adapter_model.safetensors"),
        weights(&plain, "adapter_model.safetensors")
    );
    let config: serde_json::Value =
        serde_json::from_slice(&weights(&a, "adapter_config.json")).unwrap();
    assert_eq!(config["lora_dropout"], 0.3);
}
