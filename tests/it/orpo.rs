//! `orpo` on a micro policy and its preference pairs.

use std::path::Path;

use crate::pipeline::{Micro, metrics};
use crate::{ok, s};

fn mean(rows: &[serde_json::Value], k: &str) -> f64 {
    rows.iter().map(|r| r[k].as_f64().unwrap()).sum::<f64>() / rows.len() as f64
}

#[test]
fn orpo_loss_falls_and_held_out_accuracy_rises_and_its_lora_adapter_trains() {
    let m = Micro::new("200", "24", "200");
    let policy = m.policy();
    let prefs = m.prefs(&policy);
    let eval = m.path("prefs_eval.jsonl");
    m.prefs_into(&policy, "eval_prompts.jsonl", &eval, "1");
    let run = |name: &str, lr: &str, extra: &[&str]| {
        let out = m.path(name);
        let mut args = vec![
            "orpo",
            "--policy",
            s(&policy),
            "--data",
            s(&prefs),
            "--eval",
            s(&eval),
            "--out",
            s(&out),
            "--steps",
            "40",
            "--batch-size",
            "8",
            "--lr",
            lr,
            "--warmup",
            "3",
            "--eval-every",
            "1",
            "--lambda",
            "1",
        ];
        args.extend_from_slice(extra);
        ok(&args);
        out
    };
    let check = |dir: &Path, held_out: bool| {
        let log = metrics(dir);
        assert_eq!(log.len(), 40);
        let at = |i: usize, k: &str| log[i][k].as_f64().unwrap();
        let evals: Vec<(f64, f64)> = (0..40)
            .map(|i| (at(i, "eval_loss"), at(i, "eval_reward_accuracy")))
            .collect();
        // held out, on the same pairs at every step: the loss falls, the accuracy rises
        if held_out {
            assert!(evals[39].0 < evals[0].0 - 0.1, "eval loss: {evals:?}");
            assert!(evals[39].1 > evals[0].1, "eval accuracy: {evals:?}");
        }
        let train = |k: &str| (mean(&log[..5], k), mean(&log[30..], k));
        let (loss, ratio) = (train("loss"), train("log_odds_ratio"));
        assert!(
            loss.1 < loss.0 && ratio.1 > ratio.0,
            "{loss:?} {ratio:?} {evals:?}"
        );
    };
    let full = run("orpo", "1e-2", &[]);
    check(&full, true);
    assert!(full.join("model.safetensors").is_file());
    let lora = run("orpo_lora", "1e-2", &["--lora-rank", "8"]);
    check(&lora, false);
    assert!(lora.join("adapter_model.safetensors").is_file());
    let provenance: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(lora.join("posttrain.json")).unwrap())
            .unwrap();
    assert_eq!(provenance["stage"], "orpo");
}
