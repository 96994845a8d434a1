//! The data → pretrain → generate → score chain on a micro config.

use std::path::{Path, PathBuf};

use crate::{fails, ok, s};

pub(crate) fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A synthesized task and a model config small enough to train in seconds.
pub(crate) struct Micro {
    dir: tempfile::TempDir,
    pub task: PathBuf,
    pub tokenizer: PathBuf,
    pub config: PathBuf,
}

impl Micro {
    pub fn new(train: &str, eval: &str, vocab: &str) -> Self {
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
            train,
            "--eval",
            eval,
            "--vocab-size",
            vocab,
        ]);
        let mut c: serde_json::Value =
            serde_json::from_slice(&std::fs::read(task.join("student.json")).unwrap()).unwrap();
        c["hidden_size"] = 32.into();
        c["intermediate_size"] = 64.into();
        c["num_hidden_layers"] = 1.into();
        c["layer_types"] = serde_json::json!(["sliding_attention"]);
        c["head_dim"] = 16.into();
        c["query_pre_attn_scalar"] = 16.into();
        let config = dir.path().join("micro.json");
        std::fs::write(&config, c.to_string()).unwrap();
        let tokenizer = task.join("tokenizer.json");
        Micro {
            dir,
            task,
            tokenizer,
            config,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A policy pretrained for 30 steps on the task's pairs (`policy`).
    pub fn policy(&self) -> PathBuf {
        let policy = self.path("policy");
        let train = self.task.join("train.jsonl");
        ok(&self.pretrain_args(
            &train,
            &policy,
            &[
                "--steps",
                "30",
                "--batch-size",
                "16",
                "--lr",
                "1e-2",
                "--warmup",
                "3",
            ],
        ));
        policy
    }

    /// Preference pairs (`prefs.jsonl`) sampled from `policy` on the train prompts.
    pub fn prefs(&self, policy: &Path) -> PathBuf {
        let prefs = self.path("prefs.jsonl");
        self.prefs_into(policy, "train_prompts.jsonl", &prefs, "0");
        prefs
    }

    /// Preference pairs sampled from `policy` on the task's `prompts` file into `out`.
    pub fn prefs_into(&self, policy: &Path, prompts: &str, out: &Path, seed: &str) {
        ok(&[
            "data",
            "prefs",
            "--policy",
            s(policy),
            "--prompts",
            s(&self.task.join(prompts)),
            "--out",
            s(out),
            "--samples",
            "4",
            "--pairs-per-prompt",
            "2",
            "--max-new-tokens",
            "12",
            "--seed",
            seed,
        ]);
    }

    /// `posttrain pretrain` on `data` into `out`, plus `extra` flags.
    pub fn pretrain_args<'a>(
        &'a self,
        data: &'a Path,
        out: &'a Path,
        extra: &[&'a str],
    ) -> Vec<&'a str> {
        let mut args = vec![
            "pretrain",
            "--config",
            s(&self.config),
            "--tokenizer",
            s(&self.tokenizer),
            "--data",
            s(data),
            "--out",
            s(out),
        ];
        args.extend_from_slice(extra);
        args
    }
}

#[test]
fn synth_pretrain_generate_score() {
    let m = Micro::new("300", "20", "200");
    for f in [
        "train.jsonl",
        "eval.jsonl",
        "train_prompts.jsonl",
        "eval_prompts.jsonl",
        "tokenizer.json",
        "teacher.json",
        "student.json",
    ] {
        assert!(m.task.join(f).is_file(), "{f}");
    }
    // the references score full marks
    let eval = m.task.join("eval.jsonl");
    let summary: serde_json::Value =
        serde_json::from_str(&ok(&["data", "score", "--input", s(&eval)])).unwrap();
    assert_eq!(summary["mean_score"], 1.0);
    assert_eq!(summary["rows"], 20);

    let model = m.path("model");
    let train = m.task.join("train.jsonl");
    let mut args = m.pretrain_args(&train, &model, &["--steps", "60", "--batch-size", "16"]);
    args.extend([
        "--lr",
        "1e-2",
        "--warmup",
        "5",
        "--eval-every",
        "30",
        "--eval",
        s(&eval),
    ]);
    ok(&args);
    let log = metrics(&model);
    assert_eq!(log.len(), 60);
    let first = log[0]["loss"].as_f64().unwrap();
    let last: f64 = log[50..]
        .iter()
        .map(|r| r["loss"].as_f64().unwrap())
        .sum::<f64>()
        / 10.0;
    assert!(
        last < 0.6 * first,
        "loss should fall well below the first: {first} -> {last}"
    );
    assert!(log[29]["eval_loss"].is_number() && log[59]["eval_loss"].is_number());
    let provenance: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model.join("posttrain.json")).unwrap()).unwrap();
    assert_eq!(provenance["stage"], "pretrain");
    assert_eq!(provenance["params"]["train"]["optim"]["steps"], 60);
    assert_eq!(provenance["parents"].as_array().unwrap().len(), 3);
    assert!(model.join("tokenizer.json").is_file() && model.join("model.safetensors").is_file());

    let prompts = m.task.join("eval_prompts.jsonl");
    let generate = |out: &Path| {
        ok(&[
            "generate",
            "--model",
            s(&model),
            "--prompts",
            s(&prompts),
            "--out",
            s(out),
            "--topk",
            "4",
            "--max-new-tokens",
            "16",
            "--temperature",
            "0",
        ])
    };
    let pairs = m.path("pairs.parquet");
    generate(&pairs);
    let scored = m.path("scored.jsonl");
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
    let again = m.path("again.parquet");
    generate(&again);
    assert_eq!(
        std::fs::read(&pairs).unwrap(),
        std::fs::read(&again).unwrap()
    );

    // distillation from the trained model runs and logs the KL term
    let student = m.path("student");
    ok(&m.pretrain_args(
        &train,
        &student,
        &[
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
        ],
    ));
    assert!(metrics(&student)[0]["kl"].as_f64().unwrap() > 0.0);
}

#[test]
fn pretrain_refuses_bad_inputs() {
    let m = Micro::new("50", "5", "150");
    let bad = m.path("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"prompt\": \"What is 1 plus 1?\", \"completion\": \"\"}\n",
    )
    .unwrap();
    let out = m.path("m");
    fails(
        &m.pretrain_args(&bad, &out, &[]),
        &["bad.jsonl:1", "`completion` is empty"],
    );
    assert!(!out.exists(), "no checkpoint after a failure");
    let mut c: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&m.config).unwrap()).unwrap();
    c["max_position_embeddings"] = 8.into();
    std::fs::write(&m.config, c.to_string()).unwrap();
    let train = m.task.join("train.jsonl");
    fails(
        &m.pretrain_args(&train, &out, &[]),
        &[
            "train.jsonl: row 1",
            "exceed the context of 8",
            "--truncate",
        ],
    );
}

#[test]
fn pretrain_on_plain_text() {
    let m = Micro::new("50", "5", "150");
    let text = m.path("text.jsonl");
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
    let model = m.path("lm");
    ok(&m.pretrain_args(
        &text,
        &model,
        &[
            "--steps",
            "40",
            "--batch-size",
            "8",
            "--lr",
            "1e-2",
            "--warmup",
            "4",
        ],
    ));
    let log = metrics(&model);
    let first = log[0]["loss"].as_f64().unwrap();
    let last = log[39]["loss"].as_f64().unwrap();
    assert!(last < 0.5 * first, "{first} -> {last}");

    std::fs::write(&text, "{\"text\": \"\"}\n").unwrap();
    fails(
        &m.pretrain_args(&text, &m.path("x"), &[]),
        &["text.jsonl:1", "column `text` is empty"],
    );
}

/// A pretrained teacher, its greedy completions of the train prompts with
/// their top-4 log-probs, and a fresh student.
fn teacher_pairs_and_student(m: &Micro) -> (PathBuf, PathBuf, PathBuf) {
    let train = m.task.join("train.jsonl");
    let teacher = m.path("teacher");
    ok(&m.pretrain_args(
        &train,
        &teacher,
        &[
            "--steps",
            "40",
            "--batch-size",
            "16",
            "--lr",
            "1e-2",
            "--warmup",
            "4",
        ],
    ));
    let pairs = m.path("pairs.jsonl");
    ok(&[
        "generate",
        "--model",
        s(&teacher),
        "--prompts",
        s(&m.task.join("train_prompts.jsonl")),
        "--out",
        s(&pairs),
        "--topk",
        "4",
        "--max-new-tokens",
        "12",
        "--temperature",
        "0",
        "--batch-size",
        "64",
    ]);
    let init = m.path("init");
    ok(&[
        "init",
        "--config",
        s(&m.config),
        "--tokenizer",
        s(&m.tokenizer),
        "--seed",
        "1",
        "--out",
        s(&init),
    ]);
    (teacher, pairs, init)
}

#[test]
fn sft_with_every_distillation_source() {
    let m = Micro::new("200", "16", "200");
    let eval = m.task.join("eval.jsonl");
    let (teacher, pairs, init) = teacher_pairs_and_student(&m);
    let sft = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "sft",
            "--model",
            s(&init),
            "--data",
            s(&pairs),
            "--eval",
            s(&eval),
            "--out",
            s(out),
            "--steps",
            "30",
            "--batch-size",
            "8",
            "--lr",
            "1e-2",
            "--warmup",
            "3",
            "--eval-every",
            "15",
            "--eval-samples",
            "8",
            "--eval-max-new-tokens",
            "8",
        ];
        args.extend_from_slice(extra);
        ok(&args);
        metrics(out)
    };
    let ce = sft(&m.path("ce"), &["--kd", "none"]);
    let first = ce[0]["loss"].as_f64().unwrap();
    let last = ce[29]["loss"].as_f64().unwrap();
    assert!(last < 0.7 * first, "sft lowers the loss: {first} -> {last}");
    assert!(ce[29]["kl"].is_null());
    let score = ce[29]["eval_score"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&score) && ce[14]["eval_loss"].is_number());

    let topk = sft(&m.path("topk"), &["--alpha", "0.5"]);
    assert!(
        topk[0]["kl"].as_f64().unwrap() > 0.0,
        "auto picks the stored top-k"
    );
    let live = sft(
        &m.path("live"),
        &["--teacher", s(&teacher), "--alpha", "0.5"],
    );
    assert!(live[0]["kl"].as_f64().unwrap() > 0.0);
    assert_ne!(topk[0]["kl"], live[0]["kl"]);
    let gkd = sft(
        &m.path("gkd"),
        &[
            "--teacher",
            s(&teacher),
            "--on-policy-fraction",
            "0.5",
            "--grad-accum",
            "2",
        ],
    );
    let sampled: u64 = gkd
        .iter()
        .map(|r| r["on_policy_batches"].as_u64().unwrap())
        .sum();
    assert!(
        sampled > 10 && sampled < 50,
        "about half of 60 micro-batches: {sampled}"
    );
    assert!(
        gkd.iter()
            .any(|r| r["jsd"].as_f64().is_some_and(|j| j > 0.0))
    );

    let provenance: serde_json::Value =
        serde_json::from_slice(&std::fs::read(m.path("gkd").join("posttrain.json")).unwrap())
            .unwrap();
    assert_eq!(provenance["stage"], "sft");
    assert_eq!(provenance["parents"].as_array().unwrap().len(), 4);
    assert_eq!(provenance["params"]["train"]["on_policy"]["fraction"], 0.5);
    assert!(provenance["metrics"]["eval_score"]["score"].is_number());
}

#[test]
fn sft_refuses_bad_inputs() {
    let m = Micro::new("40", "5", "150");
    let init = m.path("init");
    ok(&[
        "init",
        "--config",
        s(&m.config),
        "--tokenizer",
        s(&m.tokenizer),
        "--out",
        s(&init),
    ]);
    let train = m.task.join("train.jsonl");
    let out = m.path("out");
    let sft = |data: &Path, extra: &[&str], needles: &[&str]| {
        let mut args = vec![
            "sft",
            "--model",
            s(&init),
            "--data",
            s(data),
            "--out",
            s(&out),
        ];
        args.extend_from_slice(extra);
        fails(&args, needles);
        assert!(!out.exists());
    };
    sft(
        &train,
        &["--kd", "topk"],
        &["train.jsonl: row 1", "teacher_topk"],
    );
    sft(&train, &["--kd", "live"], &["--kd live needs --teacher"]);
    sft(
        &train,
        &["--on-policy-fraction", "0.5"],
        &["needs --teacher"],
    );
    sft(
        &train,
        &["--on-policy-fraction", "2"],
        &["--on-policy-fraction", "[0, 1]"],
    );
    let bad = m.path("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"prompt\": \"What is 1 plus 1?\", \"completion\": \"2.\"}\n\
         {\"prompt\": \"What is 1 plus 2?\", \"completion\": \"3.\", \"teacher_topk_ids\": [[5]], \"teacher_topk_logprobs\": [[-0.1]]}\n",
    )
    .unwrap();
    sft(&bad, &[], &["bad.jsonl: row 2", "1 teacher top-k rows for"]);
    std::fs::write(&bad, "{\"text\": \"plain text\"}\n").unwrap();
    sft(&bad, &[], &["bad.jsonl: row 1", "prompt/completion pairs"]);
}

#[test]
fn prefs_reward_and_score() {
    let m = Micro::new("200", "24", "200");
    let policy = m.policy();
    let (train_prefs, eval_prefs) = preference_data(&m, &policy);
    let (rm, log) = reward_model(&m, &policy, &train_prefs, &eval_prefs);
    scores(&m, &rm, &eval_prefs, &log);
    reward_from_a_trunk_and_refusals(&m, &policy, &train_prefs);
}

/// Preference pairs labelled by the task scorer, reproducible by seed.
fn preference_data(m: &Micro, policy: &Path) -> (PathBuf, PathBuf) {
    let prefs = |prompts: &str, out: &Path, seed: &str| {
        m.prefs_into(policy, prompts, out, seed);
        datasets_rows(out)
    };
    let train_prefs = m.path("prefs.jsonl");
    let rows = prefs("train_prompts.jsonl", &train_prefs, "0");
    assert!(rows.len() > 50, "{} pairs", rows.len());
    for r in rows.iter().take(4) {
        let (c, rj) = (
            r["chosen"].as_str().unwrap(),
            r["rejected"].as_str().unwrap(),
        );
        let p = r["prompt"].as_str().unwrap();
        assert_ne!(c, rj);
        // the labels follow the ground-truth scorer
        let score = |text: &str| {
            let one = m.path("one.jsonl");
            std::fs::write(
                &one,
                serde_json::json!({"prompt": p, "completion": text}).to_string(),
            )
            .unwrap();
            let v: serde_json::Value =
                serde_json::from_str(&ok(&["data", "score", "--input", s(&one)])).unwrap();
            v["mean_score"].as_f64().unwrap()
        };
        assert!(score(c) > score(rj), "{p}: {c:?} vs {rj:?}");
    }
    let eval_prefs = m.path("prefs_eval.jsonl");
    prefs("eval_prompts.jsonl", &eval_prefs, "1");
    let again = m.path("again.jsonl");
    prefs("eval_prompts.jsonl", &again, "1");
    assert_eq!(
        std::fs::read(&eval_prefs).unwrap(),
        std::fs::read(&again).unwrap()
    );
    (train_prefs, eval_prefs)
}

/// A 3x reward model whose Bradley-Terry loss falls; its metrics.
fn reward_model(
    m: &Micro,
    policy: &Path,
    train_prefs: &Path,
    eval_prefs: &Path,
) -> (PathBuf, Vec<serde_json::Value>) {
    let rm = m.path("rm");
    ok(&[
        "reward",
        "--policy",
        s(policy),
        "--size-ratio",
        "3",
        "--data",
        s(train_prefs),
        "--eval",
        s(eval_prefs),
        "--out",
        s(&rm),
        "--steps",
        "40",
        "--batch-size",
        "8",
        "--lr",
        "2e-3",
        "--warmup",
        "4",
        "--eval-every",
        "20",
    ]);
    let log = metrics(&rm);
    let mean = |r: &[serde_json::Value]| {
        r.iter().map(|x| x["loss"].as_f64().unwrap()).sum::<f64>() / r.len() as f64
    };
    assert!(mean(&log[30..]) < mean(&log[..10]), "BT loss falls");
    assert!(log[39]["eval_accuracy"].as_f64().unwrap() >= 0.0);
    let provenance: serde_json::Value =
        serde_json::from_slice(&std::fs::read(rm.join("posttrain.json")).unwrap()).unwrap();
    let ratio = provenance["metrics"]["size_ratio"].as_f64().unwrap();
    assert!((ratio / 3.0 - 1.0).abs() < 0.2, "ratio {ratio}");
    assert_eq!(provenance["stage"], "reward");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(rm.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        config["architectures"][0],
        "Gemma2ForSequenceClassification"
    );
    (rm, log)
}

/// `score` of rows and of pairs, as the reward stage's own eval.
fn scores(m: &Micro, rm: &Path, eval_prefs: &Path, log: &[serde_json::Value]) {
    // score: one reward per row, deterministic, Parquet out
    let scored = m.path("scored.parquet");
    let pairs = m.task.join("eval.jsonl");
    ok(&[
        "score",
        "--reward",
        s(rm),
        "--input",
        s(&pairs),
        "--out",
        s(&scored),
    ]);
    let stdout = ok(&["score", "--reward", s(rm), "--input", s(&pairs)]);
    let rewards: Vec<f64> = stdout
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["reward"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(rewards.len(), 24);
    assert!(rewards.iter().any(|r| (r - rewards[0]).abs() > 1e-6));
    // score --pairs: the final held-out eval of the reward stage, from the checkpoint
    let stats: serde_json::Value =
        serde_json::from_str(&ok(&["score", "--reward", s(rm), "--pairs", s(eval_prefs)])).unwrap();
    assert_eq!(stats["pairs"], datasets_rows(eval_prefs).len());
    assert_eq!(stats["accuracy"], log[39]["eval_accuracy"]);
    fails(
        &[
            "score",
            "--reward",
            s(rm),
            "--input",
            s(&pairs),
            "--out",
            s(&scored),
        ],
        &["scored.parquet", "already exists"],
    );
}

fn reward_from_a_trunk_and_refusals(m: &Micro, policy: &Path, train_prefs: &Path) {
    // from a larger checkpoint's trunk, with a new head
    let rm2 = m.path("rm2");
    ok(&[
        "reward",
        "--policy",
        s(policy),
        "--init",
        s(policy),
        "--data",
        s(train_prefs),
        "--out",
        s(&rm2),
        "--steps",
        "2",
        "--batch-size",
        "4",
    ]);
    let story = m.path("story.jsonl");
    std::fs::write(
        &story,
        "{\"prompt\": \"What is 1 plus 2?\"}\n{\"prompt\": \"Tell me a story.\"}\n",
    )
    .unwrap();
    let out = m.path("x.jsonl");
    fails(
        &[
            "data",
            "prefs",
            "--policy",
            s(policy),
            "--prompts",
            s(&story),
            "--out",
            s(&out),
        ],
        &[
            "story.jsonl",
            "prompt 2 is not a question of the embedded task",
        ],
    );
    assert!(!out.exists());
}

fn datasets_rows(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
