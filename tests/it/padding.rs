//! `--length-multiple`: batches padded to a multiple of N tokens (what GPU
//! backends get, to bound their kernel shapes) train and sample as unpadded
//! ones, through fewer distinct shapes.

use std::path::Path;

use crate::pipeline::Micro;
use crate::{ok, s};

fn losses(dir: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64())
        .collect()
}

fn batch_shapes(dir: &Path) -> u64 {
    let p: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("posttrain.json")).unwrap()).unwrap();
    p["metrics"]["batch_shapes"].as_u64().unwrap()
}

/// `args` (with `{out}`) with multiples 1 and 16: the same losses within
/// `tolerance` relative, and fewer shapes padded.
fn padded_like_unpadded(m: &Micro, stage: &str, args: &[&str], tolerance: f64) {
    let [plain, padded] = ["1", "16"].map(|n| {
        let out = m.path(&format!("{stage}-{n}"));
        let mut a: Vec<&str> = args
            .iter()
            .map(|&x| if x == "{out}" { s(&out) } else { x })
            .collect();
        a.extend(["--length-multiple", n]);
        ok(&a);
        out
    });
    let (a, b) = (losses(&plain), losses(&padded));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert!(
            (x - y).abs() <= tolerance * x.abs().max(1.0),
            "{stage}: {a:?}\n{b:?}"
        );
    }
    let (few, many) = (batch_shapes(&padded), batch_shapes(&plain));
    eprintln!("{stage}: {many} batch shapes unpadded, {few} padded to 16");
    assert!(few < many, "{stage}: {few} shapes padded, {many} not");
}

#[test]
fn batches_padded_to_a_multiple_train_like_unpadded_ones() {
    let m = Micro::new("200", "8", "200");
    let policy = m.policy();
    let policy = s(&policy);
    let data = m.task.join("train.jsonl");
    let short = ["--steps", "12", "--batch-size", "8", "--eval-every", "0"];
    let sft = [
        &[
            "sft",
            "--model",
            policy,
            "--data",
            s(&data),
            "--out",
            "{out}",
        ][..],
        &short,
    ];
    padded_like_unpadded(&m, "sft", &sft.concat(), 1e-5);
    let prefs = m.prefs(Path::new(policy));
    let reward = [
        &[
            "reward",
            "--policy",
            policy,
            "--data",
            s(&prefs),
            "--out",
            "{out}",
        ][..],
        &["--size-ratio", "2"],
        &short,
    ];
    padded_like_unpadded(&m, "reward", &reward.concat(), 1e-5);
    let dpo = [
        &[
            "dpo",
            "--policy",
            policy,
            "--data",
            s(&prefs),
            "--out",
            "{out}",
        ][..],
        &short,
    ];
    padded_like_unpadded(&m, "dpo", &dpo.concat(), 1e-5);
    let prompts = m.task.join("train_prompts.jsonl");
    let rlhf = [
        "rlhf",
        "--policy",
        policy,
        "--task-reward",
        "--prompts",
        s(&prompts),
        "--out",
        "{out}",
        "--steps",
        "4",
        "--prompts-per-step",
        "8",
        "--max-new-tokens",
        "12",
    ];
    padded_like_unpadded(&m, "rlhf", &rlhf, 1e-4);

    // greedy samples of left-padded prompts: the same text
    let sample = |n: &str| {
        ok(&[
            "sample",
            "--model",
            policy,
            "--prompts",
            s(&prompts),
            "--temperature",
            "0",
            "--max-new-tokens",
            "12",
            "--length-multiple",
            n,
        ])
    };
    assert_eq!(sample("1"), sample("16"));
}
