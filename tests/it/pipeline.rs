//! The data → pretrain → generate → score chain on a micro config.

use std::path::Path;

use crate::{fails, ok, s};

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A config small enough to train in seconds, with the task's vocabulary.
fn micro_config(task: &Path, out: &Path) {
    let mut c: serde_json::Value =
        serde_json::from_slice(&std::fs::read(task.join("student.json")).unwrap()).unwrap();
    c["hidden_size"] = 32.into();
    c["intermediate_size"] = 64.into();
    c["num_hidden_layers"] = 1.into();
    c["layer_types"] = serde_json::json!(["sliding_attention"]);
    c["head_dim"] = 16.into();
    c["query_pre_attn_scalar"] = 16.into();
    std::fs::write(out, c.to_string()).unwrap();
}

#[test]
fn synth_pretrain_generate_score() {
    let dir = tempfile::tempdir().unwrap();
    let task = dir.path().join("task");
    ok(&[
        "data",
        "synth",
        "--seed",
        "3",
        "--out",
        s(&task),
        "--train",
        "300",
        "--eval",
        "20",
        "--vocab-size",
        "200",
    ]);
    for f in [
        "train.jsonl",
        "eval.jsonl",
        "train_prompts.jsonl",
        "eval_prompts.jsonl",
        "tokenizer.json",
        "teacher.json",
        "student.json",
    ] {
        assert!(task.join(f).is_file(), "{f}");
    }
    // the references score full marks
    let summary: serde_json::Value = serde_json::from_str(&ok(&[
        "data",
        "score",
        "--input",
        s(&task.join("eval.jsonl")),
    ]))
    .unwrap();
    assert_eq!(summary["mean_score"], 1.0);
    assert_eq!(summary["rows"], 20);

    let config = dir.path().join("micro.json");
    micro_config(&task, &config);
    let model = dir.path().join("model");
    ok(&[
        "pretrain",
        "--config",
        s(&config),
        "--tokenizer",
        s(&task.join("tokenizer.json")),
        "--data",
        s(&task.join("train.jsonl")),
        "--eval",
        s(&task.join("eval.jsonl")),
        "--out",
        s(&model),
        "--steps",
        "60",
        "--batch-size",
        "16",
        "--lr",
        "1e-2",
        "--warmup",
        "5",
        "--eval-every",
        "30",
    ]);
    let m = metrics(&model);
    assert_eq!(m.len(), 60);
    let first = m[0]["loss"].as_f64().unwrap();
    let last: f64 = m[50..]
        .iter()
        .map(|r| r["loss"].as_f64().unwrap())
        .sum::<f64>()
        / 10.0;
    assert!(
        last < 0.6 * first,
        "loss should fall well below the first: {first} -> {last}"
    );
    assert!(m[29]["eval_loss"].is_number() && m[59]["eval_loss"].is_number());
    let provenance: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model.join("posttrain.json")).unwrap()).unwrap();
    assert_eq!(provenance["stage"], "pretrain");
    assert_eq!(provenance["params"]["train"]["steps"], 60);
    assert_eq!(provenance["parents"].as_array().unwrap().len(), 3);
    assert!(model.join("tokenizer.json").is_file() && model.join("model.safetensors").is_file());

    let pairs = dir.path().join("pairs.parquet");
    ok(&[
        "generate",
        "--model",
        s(&model),
        "--prompts",
        s(&task.join("eval_prompts.jsonl")),
        "--out",
        s(&pairs),
        "--topk",
        "4",
        "--max-new-tokens",
        "16",
        "--temperature",
        "0",
    ]);
    let scored = dir.path().join("scored.jsonl");
    let summary: serde_json::Value = serde_json::from_str(&ok(&[
        "data",
        "score",
        "--input",
        s(&pairs),
        "--out",
        s(&scored),
    ]))
    .unwrap();
    assert!(summary["rows"].as_u64().unwrap() > 0);
    let mean = summary["mean_score"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&mean));
    // greedy generation is reproducible
    let again = dir.path().join("again.parquet");
    ok(&[
        "generate",
        "--model",
        s(&model),
        "--prompts",
        s(&task.join("eval_prompts.jsonl")),
        "--out",
        s(&again),
        "--topk",
        "4",
        "--max-new-tokens",
        "16",
        "--temperature",
        "0",
    ]);
    assert_eq!(
        std::fs::read(&pairs).unwrap(),
        std::fs::read(&again).unwrap()
    );

    // distillation from the trained model runs and logs the KL term
    let student = dir.path().join("student");
    ok(&[
        "pretrain",
        "--config",
        s(&config),
        "--tokenizer",
        s(&task.join("tokenizer.json")),
        "--data",
        s(&task.join("train.jsonl")),
        "--out",
        s(&student),
        "--steps",
        "5",
        "--batch-size",
        "8",
        "--teacher",
        s(&model),
        "--alpha",
        "0.5",
        "--temperature",
        "2",
    ]);
    assert!(metrics(&student)[0]["kl"].as_f64().unwrap() > 0.0);
}

#[test]
fn pretrain_refuses_bad_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let task = dir.path().join("task");
    ok(&[
        "data",
        "synth",
        "--out",
        s(&task),
        "--train",
        "50",
        "--eval",
        "5",
        "--vocab-size",
        "150",
    ]);
    let config = dir.path().join("micro.json");
    micro_config(&task, &config);
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"prompt\": \"What is 1 plus 1?\", \"completion\": \"\"}\n",
    )
    .unwrap();
    let out = dir.path().join("m");
    fails(
        &[
            "pretrain",
            "--config",
            s(&config),
            "--tokenizer",
            s(&task.join("tokenizer.json")),
            "--data",
            s(&bad),
            "--out",
            s(&out),
        ],
        &["bad.jsonl:1", "`completion` is empty"],
    );
    assert!(!out.exists(), "no checkpoint after a failure");
    let mut c: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    c["max_position_embeddings"] = 8.into();
    std::fs::write(&config, c.to_string()).unwrap();
    fails(
        &[
            "pretrain",
            "--config",
            s(&config),
            "--tokenizer",
            s(&task.join("tokenizer.json")),
            "--data",
            s(&task.join("train.jsonl")),
            "--out",
            s(&out),
        ],
        &[
            "train.jsonl: row 1",
            "exceed the context of 8",
            "--truncate",
        ],
    );
}

#[test]
fn pretrain_on_plain_text() {
    let dir = tempfile::tempdir().unwrap();
    let task = dir.path().join("task");
    ok(&[
        "data",
        "synth",
        "--out",
        s(&task),
        "--train",
        "50",
        "--eval",
        "5",
        "--vocab-size",
        "150",
    ]);
    let config = dir.path().join("micro.json");
    micro_config(&task, &config);
    let text = dir.path().join("text.jsonl");
    let rows: String = (0..40)
        .map(|i| {
            format!(
                "{{\"text\": \"The word cat reversed is tac. {} plus 1 is {}.\"}}\n",
                i % 9,
                i % 9 + 1
            )
        })
        .collect();
    std::fs::write(&text, rows).unwrap();
    let model = dir.path().join("lm");
    ok(&[
        "pretrain",
        "--config",
        s(&config),
        "--tokenizer",
        s(&task.join("tokenizer.json")),
        "--data",
        s(&text),
        "--out",
        s(&model),
        "--steps",
        "40",
        "--batch-size",
        "8",
        "--lr",
        "1e-2",
        "--warmup",
        "4",
    ]);
    let m = metrics(&model);
    let first = m[0]["loss"].as_f64().unwrap();
    let last = m[39]["loss"].as_f64().unwrap();
    assert!(last < 0.5 * first, "{first} -> {last}");

    std::fs::write(&text, "{\"text\": \"\"}\n").unwrap();
    fails(
        &[
            "pretrain",
            "--config",
            s(&config),
            "--tokenizer",
            s(&task.join("tokenizer.json")),
            "--data",
            s(&text),
            "--out",
            s(&dir.path().join("x")),
        ],
        &["text.jsonl:1", "column `text` is empty"],
    );
}
