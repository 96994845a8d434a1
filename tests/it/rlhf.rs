//! rlhf → warp merge → eval on a micro config, and the weight algebra on
//! checkpoints.

use std::path::{Path, PathBuf};

use crate::pipeline::{Micro, metrics};
use crate::{fails, ok, s};

/// A micro policy, its preference data and a 3x reward model.
fn policy_and_reward(m: &Micro) -> (PathBuf, PathBuf) {
    let policy = m.policy();
    let prefs = m.prefs(&policy);
    let rm = m.path("rm");
    ok(&[
        "reward",
        "--policy",
        s(&policy),
        "--size-ratio",
        "3",
        "--data",
        s(&prefs),
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
    ]);
    (policy, rm)
}

fn rlhf(m: &Micro, policy: &Path, rm: &Path, out: &Path, extra: &[&str]) {
    let prompts = m.task.join("train_prompts.jsonl");
    let mut args = vec![
        "rlhf",
        "--policy",
        s(policy),
        "--reward",
        s(rm),
        "--prompts",
        s(&prompts),
        "--out",
        s(out),
        "--steps",
        "30",
        "--prompts-per-step",
        "8",
        "--samples",
        "4",
        "--max-new-tokens",
        "12",
        "--lr",
        "3e-3",
        "--warmup",
        "2",
    ];
    args.extend_from_slice(extra);
    ok(&args);
}

fn weights(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("model.safetensors")).unwrap()
}

/// The metrics of a run without its wall-clock fields.
fn untimed(dir: &Path) -> Vec<serde_json::Value> {
    let mut rows = metrics(dir);
    for r in &mut rows {
        let r = r.as_object_mut().unwrap();
        r.retain(|k, _| !k.ends_with("_s") && k != "rollout_tokens_per_s");
    }
    rows
}

/// `eval` table rows by checkpoint.
fn eval_rows(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn rlhf_warp_and_eval() {
    let m = Micro::new("200", "24", "200");
    let (policy, rm) = policy_and_reward(&m);
    let rl = rl_runs(&m, &policy, &rm);
    let points = merges(&m, &policy, &rl);
    eval_table(&m, &policy, &rm, &rl, &points);
    lineage(&m, &points);
}

/// Two EMA-anchored runs with snapshots and one with the fixed SFT anchor.
fn rl_runs(m: &Micro, policy: &Path, rm: &Path) -> [PathBuf; 2] {
    let rl = [m.path("rl0"), m.path("rl1")];
    for (seed, out) in rl.iter().enumerate() {
        rlhf(
            m,
            policy,
            rm,
            out,
            &["--seed", &seed.to_string(), "--snapshot-every", "10"],
        );
    }
    let snapshots: Vec<String> = std::fs::read_dir(rl[0].join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(snapshots, ["step-000010", "step-000020"]);
    let anchor = m.path("rl_sft_anchor");
    rlhf(
        m,
        policy,
        rm,
        &anchor,
        &["--anchor", "sft", "--anchor-out", s(&m.path("anchor_copy"))],
    );
    let log = metrics(&rl[0]);
    assert_eq!(log.len(), 30);
    for key in [
        "reward",
        "kl_anchor",
        "kl_init",
        "length",
        "entropy",
        "score",
        "accuracy",
        "rollout_s",
        "reward_s",
        "update_s",
    ] {
        assert!(log[0][key].as_f64().unwrap().is_finite(), "{key}");
    }
    // the policy moves away from its init (the reward's rise is checked on held-out prompts below:
    // per step it swings with the kind of question the length-bucketed batch holds)
    assert_eq!(log[0]["step"], 1);
    assert!(log[29]["kl_init"].as_f64().unwrap() > 0.1, "{}", log[29]);
    // with a fixed anchor the two KLs are one; the EMA anchor lags the policy less than the init
    let fixed = metrics(&anchor);
    assert!(fixed.iter().all(|r| r["kl_anchor"] == r["kl_init"]));
    assert!(log.iter().any(|r| r["kl_anchor"] != r["kl_init"]));
    // the saved SFT anchor is the policy it started from
    assert_eq!(weights(&m.path("anchor_copy")), weights(policy));
    assert_ne!(weights(&rl[0]), weights(&rl[1]), "seeds differ");
    rl
}

/// An η sweep, one policy at η = 1, and an EMA step on checkpoints.
fn merges(m: &Micro, policy: &Path, rl: &[PathBuf; 2]) -> Vec<PathBuf> {
    // merge: an η sweep, one checkpoint each
    let warp = m.path("warp");
    ok(&[
        "warp",
        "merge",
        "--init",
        s(policy),
        "--policies",
        s(&rl[0]),
        s(&rl[1]),
        "--eta",
        "0,0.5,1",
        "--out",
        s(&warp),
    ]);
    let points: Vec<PathBuf> = ["eta-0.00", "eta-0.50", "eta-1.00"]
        .iter()
        .map(|n| warp.join(n))
        .collect();
    assert_eq!(weights(&points[0]), weights(policy), "η = 0 is the init");
    assert_ne!(weights(&points[1]), weights(&points[2]));
    let provenance: serde_json::Value =
        serde_json::from_slice(&std::fs::read(points[1].join("posttrain.json")).unwrap()).unwrap();
    assert_eq!(provenance["stage"], "warp-merge");
    assert_eq!(provenance["parents"].as_array().unwrap().len(), 3);
    assert!(
        provenance["params"]["angles_degrees"][0]["model.layers.0"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    // one policy, η = 1: the policy itself
    let single = m.path("single");
    ok(&[
        "warp",
        "merge",
        "--init",
        s(policy),
        "--policies",
        s(&rl[0]),
        "--eta",
        "1",
        "--out",
        s(&single),
    ]);
    assert_eq!(weights(&single), weights(&rl[0]));
    // EMA with μ = 1 copies the policy
    let ema = m.path("ema");
    ok(&[
        "warp",
        "ema",
        "--anchor",
        s(policy),
        "--policy",
        s(&rl[1]),
        "--mu",
        "1",
        "--out",
        s(&ema),
    ]);
    assert_eq!(weights(&ema), weights(&rl[1]));
    points
}

/// `eval` over the init, a run, a merge point and a snapshot.
fn eval_table(m: &Micro, policy: &Path, rm: &Path, rl: &[PathBuf; 2], points: &[PathBuf]) {
    // eval: one row per checkpoint; the reference has KL 0 to itself
    let table = m.path("eval.jsonl");
    let snapshot = rl[0].join("snapshots/step-000010");
    let prompts = m.task.join("eval_prompts.jsonl");
    let args = |out: &Path| {
        let checkpoints = [policy, &rl[0], &points[1], &snapshot].map(|p| s(p).to_string());
        let mut a = vec!["eval".to_string(), "--checkpoints".into()];
        a.extend(checkpoints);
        for (k, v) in [
            ("--prompts", s(&prompts)),
            ("--reward", s(rm)),
            ("--reference", s(policy)),
        ] {
            a.extend([k.to_string(), v.to_string()]);
        }
        a.extend(["--samples", "2", "--max-new-tokens", "12", "--out", s(out)].map(String::from));
        a
    };
    let stdout = ok(&args(&table).iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(stdout.lines().count(), 5, "{stdout}");
    // a reader that closes the pipe after the first line (`| head -1`)
    // neither fails the command nor loses the table
    let piped = m.path("eval_piped.jsonl");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_posttrain"))
        .args(args(&piped))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut first,
    )
    .unwrap();
    assert!(first.starts_with("checkpoint"), "{first}");
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !err.contains("panicked"), "{err}");
    assert_eq!(
        std::fs::read(&piped).unwrap(),
        std::fs::read(&table).unwrap()
    );
    let rows = eval_rows(&table);
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[0]["kl"].as_f64().unwrap(), 0.0);
    assert_eq!(rows[0]["samples"], 48);
    for r in &rows {
        for k in ["reward", "score", "accuracy", "length"] {
            assert!(r[k].as_f64().unwrap().is_finite(), "{k}: {r}");
        }
    }
    assert!(rows[1]["kl"].as_f64().unwrap() > 0.0);
    assert!(
        rows[1]["reward"].as_f64().unwrap() > rows[0]["reward"].as_f64().unwrap(),
        "RL raises the held-out reward: {rows:?}"
    );
    report(m);
}

/// The merge point's lineage back through the RL runs, the reward model and
/// its preference data to the pretrained policy and the task files.
fn lineage(m: &Micro, points: &[PathBuf]) {
    let lineage = |dir: &Path| {
        let text = ok(&["inspect", s(dir)]);
        let start = text.find("  lineage").expect("a lineage section");
        let end = text[start..]
            .find("  tensor ")
            .map_or(text.len(), |e| start + e);
        text[start..end].to_string()
    };
    let chain = lineage(&points[1]);
    for needle in [
        "warp-merge",
        "rlhf",
        "reward",
        "pretrain",
        "prefs.jsonl",
        "train_prompts.jsonl",
    ] {
        assert!(chain.contains(needle), "{needle} in {chain}");
    }
    assert!(
        !chain.contains("[changed]") && !chain.contains("[missing]"),
        "{chain}"
    );
    let mut prefs = std::fs::read_to_string(m.path("prefs.jsonl")).unwrap();
    prefs.push('\n');
    std::fs::write(m.path("prefs.jsonl"), prefs).unwrap();
    let chain = lineage(&points[1]);
    assert!(chain.contains("prefs.jsonl  [changed]"), "{chain}");
}

#[test]
fn warp_refuses_models_that_differ() {
    let m = Micro::new("40", "4", "200");
    let init = |out: &Path, hidden: usize| {
        let mut c: serde_json::Value =
            serde_json::from_slice(&std::fs::read(m.path("micro.json")).unwrap()).unwrap();
        c["hidden_size"] = hidden.into();
        let config = m.path(&format!("c{hidden}.json"));
        std::fs::write(&config, c.to_string()).unwrap();
        ok(&[
            "init",
            "--config",
            s(&config),
            "--tokenizer",
            s(&m.task.join("tokenizer.json")),
            "--out",
            s(out),
        ]);
    };
    let (a, b) = (m.path("a"), m.path("b"));
    init(&a, 32);
    init(&b, 48);
    let out = m.path("merged");
    fails(
        &[
            "warp",
            "merge",
            "--init",
            s(&a),
            "--policies",
            s(&a),
            s(&b),
            "--out",
            s(&out),
        ],
        &["b: config differs", "hidden_size is 32 there and 48 here"],
    );
    fails(
        &[
            "warp",
            "ema",
            "--anchor",
            s(&a),
            "--policy",
            s(&b),
            "--out",
            s(&out),
        ],
        &["hidden_size"],
    );
    fails(
        &[
            "warp",
            "ema",
            "--anchor",
            s(&a),
            "--policy",
            s(&a),
            "--mu",
            "2",
            "--out",
            s(&out),
        ],
        &["--mu must be in [0, 1]"],
    );
    assert!(!out.exists());
    // an existing output is kept
    ok(&[
        "warp",
        "merge",
        "--init",
        s(&a),
        "--policies",
        s(&a),
        "--out",
        s(&out),
    ]);
    let before = weights(&out);
    fails(
        &[
            "warp",
            "merge",
            "--init",
            s(&a),
            "--policies",
            s(&a),
            "--eta",
            "1",
            "--out",
            s(&out),
        ],
        &["merged", "already exists"],
    );
    assert_eq!(weights(&out), before);
}

#[test]
fn rlhf_refuses_one_sample_and_non_task_prompts_for_the_task_scorer() {
    let m = Micro::new("40", "4", "200");
    let a = m.path("a");
    ok(&[
        "init",
        "--config",
        s(&m.path("micro.json")),
        "--tokenizer",
        s(&m.task.join("tokenizer.json")),
        "--out",
        s(&a),
    ]);
    fails(
        &[
            "rlhf",
            "--policy",
            s(&a),
            "--reward",
            s(&a),
            "--prompts",
            s(&m.task.join("train_prompts.jsonl")),
            "--out",
            s(&m.path("rl")),
            "--samples",
            "1",
        ],
        &["--samples must be at least 2"],
    );
    let story = m.path("story.jsonl");
    std::fs::write(
        &story,
        "{\"prompt\": \"What is 1 plus 2?\"}\n{\"prompt\": \"Tell me a story.\"}\n",
    )
    .unwrap();
    fails(
        &[
            "rlhf",
            "--policy",
            s(&a),
            "--task-reward",
            "--prompts",
            s(&story),
            "--out",
            s(&m.path("rl")),
        ],
        &["story.jsonl: row 2: not a question of the embedded task"],
    );
    assert!(!m.path("rl").exists());
}

#[test]
fn warp_merges_checkpoints_without_tokenizer_files_and_copies_them_when_present() {
    let m = Micro::new("40", "4", "200");
    let (a, b) = (m.path("a"), m.path("b"));
    for (out, seed) in [(&a, "1"), (&b, "2")] {
        ok(&[
            "init",
            "--config",
            s(&m.path("micro.json")),
            "--tokenizer",
            s(&m.task.join("tokenizer.json")),
            "--seed",
            seed,
            "--out",
            s(out),
        ]);
        std::fs::remove_file(out.join("tokenizer.json")).unwrap();
    }
    let (merged, moved) = (m.path("merged"), m.path("moved"));
    ok(&[
        "warp",
        "merge",
        "--init",
        s(&a),
        "--policies",
        s(&b),
        "--eta",
        "0.5",
        "--out",
        s(&merged),
    ]);
    ok(&[
        "warp",
        "ema",
        "--anchor",
        s(&a),
        "--policy",
        s(&b),
        "--out",
        s(&moved),
    ]);
    for out in [&merged, &moved] {
        assert!(out.join("model.safetensors").is_file());
        assert!(!out.join("tokenizer.json").exists());
    }
    assert_ne!(weights(&merged), weights(&a));
    // with tokenizer files beside the init, the merge carries them unchanged
    let tokenizer = std::fs::read(m.task.join("tokenizer.json")).unwrap();
    std::fs::write(a.join("tokenizer.json"), &tokenizer).unwrap();
    std::fs::write(
        a.join("tokenizer_config.json"),
        "{\"padding_side\": \"left\"}",
    )
    .unwrap();
    ok(&[
        "warp",
        "merge",
        "--init",
        s(&a),
        "--policies",
        s(&b),
        "--out",
        s(&merged),
        "--overwrite",
    ]);
    assert_eq!(
        std::fs::read(merged.join("tokenizer.json")).unwrap(),
        tokenizer
    );
    assert!(merged.join("tokenizer_config.json").is_file());
}

#[test]
fn task_reward_raises_the_true_score() {
    let m = Micro::new("200", "24", "200");
    let policy = m.policy();
    let prompts = m.task.join("train_prompts.jsonl");
    let run = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "rlhf",
            "--policy",
            s(&policy),
            "--task-reward",
            "--prompts",
            s(&prompts),
            "--out",
            s(out),
            "--steps",
            "30",
            "--prompts-per-step",
            "8",
            "--max-new-tokens",
            "12",
            "--lr",
            "3e-3",
            "--warmup",
            "2",
        ];
        args.extend_from_slice(extra);
        ok(&args);
    };
    let rl = m.path("rl");
    run(&rl, &[]);
    // the same seed reproduces the run bit for bit (timings aside)
    let again = m.path("again");
    run(&again, &[]);
    assert_eq!(weights(&again), weights(&rl));
    assert_eq!(untimed(&again), untimed(&rl));
    // a KL bound stops the run early and says so
    let bounded = m.path("bounded");
    run(&bounded, &["--max-kl", "0.05"]);
    let log = metrics(&bounded);
    assert!(log.len() < 30, "{} steps", log.len());
    assert!(log.last().unwrap()["kl_init"].as_f64().unwrap() > 0.05);
    let provenance: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bounded.join("posttrain.json")).unwrap()).unwrap();
    assert_eq!(provenance["metrics"]["stopped_at_kl"], log.len());

    let table = m.path("eval.jsonl");
    ok(&[
        "eval",
        "--checkpoints",
        s(&policy),
        s(&rl),
        "--prompts",
        s(&m.task.join("eval_prompts.jsonl")),
        "--samples",
        "4",
        "--max-new-tokens",
        "12",
        "--out",
        s(&table),
    ]);
    let rows = eval_rows(&table);
    let score = |i: usize| rows[i]["score"].as_f64().unwrap();
    assert!(
        score(1) > score(0),
        "true score {} -> {}",
        score(0),
        score(1)
    );
    assert!(rows[0]["reward"].is_null() && rows[0]["kl"].is_null());
}

/// `report` over the whole micro run: every chart a real picture, all
/// referenced by index.html.
fn report(m: &Micro) {
    let out = m.path("report");
    ok(&["report", s(&m.path("")), "--out", s(&out), "--smooth", "5"]);
    let html = std::fs::read_to_string(out.join("index.html")).unwrap();
    for chart in [
        "loss",
        "reward_model",
        "rlhf_reward",
        "rlhf_kl",
        "pareto_reward_1",
        "pareto_score_1",
    ] {
        let png = out.join(format!("{chart}.png"));
        let img = image::open(&png).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (900, 560), "{chart}");
        let colours: std::collections::HashSet<[u8; 3]> = img.pixels().map(|p| p.0).collect();
        assert!(colours.len() > 20, "{chart}: {} colours", colours.len());
        let svg = std::fs::read_to_string(out.join(format!("{chart}.svg"))).unwrap();
        assert!(
            svg.contains("<svg") && svg.contains("<polyline"),
            "{chart}.svg"
        );
        assert!(
            html.contains(&format!("<img src=\"{chart}.png\"")),
            "{chart} in index.html"
        );
    }
    assert!(html.contains("rl0/snapshots/step-000010") && html.contains("<table>"));
    fails(
        &["report", s(&m.task), "--out", s(&m.path("empty"))],
        &["no run found under"],
    );
}

/// The named f32 tensors of a checkpoint's `model.safetensors`.
pub(crate) fn tensors(dir: &Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    crate::safetensors_f32(&dir.join("model.safetensors"))
        .into_iter()
        .collect()
}

#[test]
fn warm_averages_reward_models_from_one_initialisation() {
    let m = Micro::new("200", "24", "200");
    let policy = m.policy();
    let prefs = m.prefs(&policy);
    // two reward models from the policy's trunk and one score head (one
    // shared initialisation), other data orders; two more with heads of
    // their own seeds
    let rms: Vec<PathBuf> = ["rm_a", "rm_b", "rm_e", "rm_f"]
        .iter()
        .map(|n| m.path(n))
        .collect();
    for (i, rm) in rms.iter().enumerate() {
        let seed = (i % 2).to_string();
        let head = if i < 2 { "7" } else { &seed };
        ok(&[
            "reward",
            "--policy",
            s(&policy),
            "--init",
            s(&policy),
            "--data",
            s(&prefs),
            "--out",
            s(rm),
            "--steps",
            "20",
            "--batch-size",
            "8",
            "--seed",
            &seed,
            "--head-seed",
            head,
        ]);
    }
    let warm = m.path("warm");
    let out = crate::posttrain(&[
        "warp",
        "average",
        "--models",
        s(&rms[0]),
        s(&rms[1]),
        "--weights",
        "3,1",
        "--out",
        s(&warm),
    ]);
    assert!(out.status.success(), "{}", crate::stderr(&out));
    assert!(
        !crate::stderr(&out).contains("warning"),
        "{}",
        crate::stderr(&out)
    );
    // every tensor is 0.75·a + 0.25·b, the score head included
    let (a, b, w) = (tensors(&rms[0]), tensors(&rms[1]), tensors(&warm));
    assert!(w.contains_key("score.weight"));
    assert_eq!(a.keys().collect::<Vec<_>>(), w.keys().collect::<Vec<_>>());
    for (name, got) in &w {
        for ((x, y), z) in a[name].iter().zip(&b[name]).zip(got) {
            assert!((0.75 * x + 0.25 * y - z).abs() <= 1e-6, "{name}: {z}");
        }
    }
    assert_ne!(a, b, "the members differ");
    // the average is a reward model the scoring path reads
    let stats: serde_json::Value =
        serde_json::from_str(&ok(&["score", "--reward", s(&warm), "--pairs", s(&prefs)])).unwrap();
    assert!(stats["accuracy"].as_f64().unwrap() > 0.5, "{stats}");
    // new score heads of different seeds were not one initialisation: warned
    let out = crate::posttrain(&[
        "warp",
        "average",
        "--models",
        s(&rms[2]),
        s(&rms[3]),
        "--out",
        s(&m.path("w1")),
    ]);
    let err = crate::stderr(&out);
    assert!(
        out.status.success()
            && err.contains("score head of seed 1")
            && err.contains("shared initialisation"),
        "{err}"
    );
    // members from new weights of different seeds were not one initialisation: warned
    let fresh: Vec<PathBuf> = ["rm_c", "rm_d"].iter().map(|n| m.path(n)).collect();
    for (seed, rm) in fresh.iter().enumerate() {
        ok(&[
            "reward",
            "--policy",
            s(&policy),
            "--size-ratio",
            "1",
            "--data",
            s(&prefs),
            "--out",
            s(rm),
            "--steps",
            "2",
            "--batch-size",
            "8",
            "--seed",
            &seed.to_string(),
        ]);
    }
    let out = crate::posttrain(&[
        "warp",
        "average",
        "--models",
        s(&fresh[0]),
        s(&fresh[1]),
        "--out",
        s(&m.path("w2")),
    ]);
    let err = crate::stderr(&out);
    assert!(
        out.status.success() && err.contains("shared initialisation"),
        "{err}"
    );
}

#[test]
fn advantage_and_kl_options_train_and_differ() {
    let m = Micro::new("200", "24", "200");
    let (policy, rm) = policy_and_reward(&m);
    let run = |name: &str, extra: &[&str]| {
        let out = m.path(name);
        rlhf(&m, &policy, &rm, &out, extra);
        out
    };
    let rloo = run("rloo", &[]);
    let grpo = run(
        "grpo",
        &[
            "--advantage",
            "grpo",
            "--kl-estimator",
            "k3",
            "--kl-in",
            "loss",
        ],
    );
    let dr = run("dr", &["--advantage", "dr-grpo", "--kl-estimator", "k3"]);
    for dir in [&rloo, &grpo, &dr] {
        for row in untimed(dir) {
            for key in ["loss", "reward", "kl_anchor", "shaped_reward"] {
                assert!(row[key].as_f64().unwrap().is_finite(), "{key}: {row}");
            }
        }
    }
    assert_ne!(weights(&rloo), weights(&grpo));
    assert_ne!(weights(&rloo), weights(&dr));
    assert_ne!(weights(&grpo), weights(&dr));
    // with the KL in the loss the reward is not shaped: with β = 0 both placements are one run
    let in_reward = run("b0_reward", &["--beta", "0", "--kl-estimator", "k3"]);
    let in_loss = run(
        "b0_loss",
        &["--beta", "0", "--kl-estimator", "k3", "--kl-in", "loss"],
    );
    assert_eq!(weights(&in_reward), weights(&in_loss));
    let shaped = |dir: &Path| -> Vec<serde_json::Value> {
        untimed(dir)
            .iter()
            .map(|r| r["shaped_reward"].clone())
            .collect()
    };
    // in the loss, the shaped reward is the reward itself
    assert!(
        untimed(&grpo)
            .iter()
            .all(|r| r["shaped_reward"] == r["reward"])
    );
    assert_ne!(
        shaped(&rloo),
        untimed(&rloo)
            .iter()
            .map(|r| r["reward"].clone())
            .collect::<Vec<_>>()
    );
}
