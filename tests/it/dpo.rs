//! `dpo` on a micro policy and its preference pairs.

use std::path::Path;

use crate::pipeline::{Micro, metrics};
use crate::{error_line, fixture, ok, s};

fn weights(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("model.safetensors")).unwrap()
}

#[test]
fn dpo_and_ipo_train_from_the_reference_and_are_reproducible() {
    let m = Micro::new("200", "24", "200");
    let policy = m.policy();
    let prefs = m.prefs(&policy);
    let eval = m.path("prefs_eval.jsonl");
    m.prefs_into(&policy, "eval_prompts.jsonl", &eval, "1");
    let run = |name: &str, extra: &[&str]| {
        let out = m.path(name);
        let mut args = vec![
            "dpo",
            "--policy",
            s(&policy),
            "--data",
            s(&prefs),
            "--eval",
            s(&eval),
            "--out",
            s(&out),
            "--steps",
            "30",
            "--batch-size",
            "8",
            "--lr",
            "3e-3",
            "--warmup",
            "3",
            "--eval-every",
            "15",
        ];
        args.extend_from_slice(extra);
        ok(&args);
        out
    };
    let dpo = run("dpo", &[]);
    let log = metrics(&dpo);
    assert_eq!(log.len(), 30);
    // at step 1 the policy is its own reference: every margin is 0 and the loss ln 2
    let first = log[0]["loss"].as_f64().unwrap();
    assert!((first - 2f64.ln()).abs() < 1e-4, "{first}");
    assert!(log[0]["reward_margin"].as_f64().unwrap().abs() < 1e-4);
    let mean = |rows: &[serde_json::Value], k: &str| {
        rows.iter().map(|r| r[k].as_f64().unwrap()).sum::<f64>() / rows.len() as f64
    };
    let losses: Vec<f64> = log.iter().map(|r| r["loss"].as_f64().unwrap()).collect();
    assert!(
        mean(&log[20..], "loss") < 0.9 * first,
        "the loss falls: {losses:?}"
    );
    assert!(
        mean(&log[20..], "reward_accuracy") > 0.6,
        "{}",
        mean(&log[20..], "reward_accuracy")
    );
    assert!(
        log[29]["eval_reward_accuracy"].as_f64().unwrap() > 0.5,
        "{}",
        log[29]
    );
    // the same run twice: the same weights
    assert_eq!(weights(&run("dpo_again", &[])), weights(&dpo));
    // as β grows the optimum approaches the reference: the held-out log-ratio
    // margin (h/β) after the same steps shrinks
    let ratio = |dir: &Path, beta: f64| {
        let log = metrics(dir);
        log[29]["eval_reward_margin"].as_f64().unwrap() / beta
    };
    let large = run("dpo_beta_1e3", &["--beta", "1000"]);
    let (near, far) = (ratio(&large, 1000.0), ratio(&dpo, 0.1));
    assert!(near.abs() * 3.0 < far.abs(), "β 1000: {near}, β 0.1: {far}");
    // IPO from the reference: (0 − 1/(2β))² = 25 at β = 0.1
    let ipo = run("ipo", &["--loss", "ipo"]);
    let first = metrics(&ipo)[0]["loss"].as_f64().unwrap();
    assert!((first - 25.0).abs() < 1e-2, "{first}");
    assert_ne!(weights(&ipo), weights(&dpo));
    // a reference with another vocabulary is refused before any work
    let out = m.path("refused");
    let fx = fixture();
    error_line(
        &[
            "dpo",
            "--policy",
            s(&policy),
            "--data",
            s(&prefs),
            "--reference",
            s(&fx),
            "--out",
            s(&out),
        ],
        &["gemma2-tiny", "reference vocabulary"],
    );
    assert!(!out.exists());
}
