//! Frozen models held in 8 or 4 bits: a LoRA run on an nf4 base learns and
//! writes an ordinary adapter that reads on the full-precision base; every
//! role of frozen model loads quantized and says so in `posttrain.json`;
//! a dtype that does not exist is refused in one line.

use std::path::Path;

use crate::pipeline::{Micro, metrics};
use crate::{error_line, ok, s};

fn provenance(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("posttrain.json")).unwrap()).unwrap()
}

/// `logits` of `model` on a few ids, held as `dtype`.
fn logits(m: &Micro, model: &Path, dtype: &str) -> Vec<f32> {
    let ids = m.path("ids.safetensors");
    if !ids.exists() {
        let values: Vec<u8> = [2i64, 5, 9, 14, 3, 7, 11, 4, 6, 8, 10, 12]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![2, 6], &values)
                .unwrap();
        std::fs::write(&ids, safetensors::serialize([("ids", view)], None).unwrap()).unwrap();
    }
    let out = m.path(&format!("logits-{dtype}.safetensors"));
    ok(&[
        "logits",
        "--model",
        s(model),
        "--ids",
        s(&ids),
        "--out",
        s(&out),
        "--overwrite",
        "--weights-dtype",
        dtype,
    ]);
    crate::checkpoints::read_f32(&out, "logits").1
}

#[test]
fn lora_on_an_nf4_base_learns_and_its_adapter_reads_on_the_full_base() {
    let m = Micro::new("200", "24", "200");
    let policy = m.policy();
    let out = m.path("sft-nf4");
    ok(&[
        "sft",
        "--model",
        s(&policy),
        "--data",
        s(&m.task.join("train.jsonl")),
        "--eval",
        s(&m.task.join("eval.jsonl")),
        "--out",
        s(&out),
        "--steps",
        "60",
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
        "8",
        "--lora-alpha",
        "16",
        "--base-dtype",
        "nf4",
    ]);
    assert_eq!(provenance(&out)["held"]["base"], "nf4");
    assert!(out.join("adapter_model.safetensors").is_file());
    let evals: Vec<f64> = metrics(&out)
        .iter()
        .filter_map(|r| r["eval_loss"].as_f64())
        .collect();
    assert_eq!(evals.len(), 3);
    assert!(evals[2] < evals[0] - 0.02, "{evals:?}");
    // the adapter is an ordinary one: on the f32 base its logits differ
    // from the nf4-held ones by the quantization error only
    let full = logits(&m, &out, "f32");
    let held = logits(&m, &out, "nf4");
    let int8 = logits(&m, &out, "int8");
    let diff = |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0f32, |w, (x, y)| w.max((x - y).abs()));
    let scale = full.iter().fold(0f32, |w, x| w.max(x.abs()));
    let (d4, d8) = (diff(&full, &held), diff(&full, &int8));
    assert!(d4 > 0.0 && d4 < 0.2 * scale, "nf4 {d4} of {scale}");
    assert!(d8 < d4, "int8 ({d8}) is closer than nf4 ({d4})");
}

#[test]
fn every_frozen_role_loads_quantized() {
    let m = Micro::new("120", "8", "200");
    let policy = m.policy();
    let prefs = m.prefs(&policy);
    let rm = m.path("rm");
    ok(&[
        "reward",
        "--policy",
        s(&policy),
        "--init",
        s(&policy),
        "--data",
        s(&prefs),
        "--out",
        s(&rm),
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--eval-every",
        "0",
        "--lora-rank",
        "4",
        "--base-dtype",
        "int8",
    ]);
    let rl = m.path("rl");
    ok(&[
        "rlhf",
        "--policy",
        s(&policy),
        "--reward",
        s(&rm),
        "--prompts",
        s(&m.task.join("train_prompts.jsonl")),
        "--out",
        s(&rl),
        "--steps",
        "2",
        "--prompts-per-step",
        "2",
        "--max-new-tokens",
        "6",
        "--lora-rank",
        "4",
        "--base-dtype",
        "nf4",
        "--weights-dtype",
        "int8",
    ]);
    let held = &provenance(&rl)["held"];
    assert_eq!(held["base"], "nf4");
    assert_eq!(held["reward"], "int8");
    let pairs = m.path("pairs.jsonl");
    ok(&[
        "generate",
        "--model",
        s(&policy),
        "--prompts",
        s(&m.task.join("eval_prompts.jsonl")),
        "--out",
        s(&pairs),
        "--topk",
        "4",
        "--max-new-tokens",
        "6",
        "--weights-dtype",
        "nf4",
    ]);
    let meta = provenance_beside(&pairs);
    assert_eq!(meta["held"]["model"], "nf4");
    let score = ok(&[
        "score",
        "--reward",
        s(&rm),
        "--pairs",
        s(&prefs),
        "--weights-dtype",
        "nf4",
    ]);
    assert!(score.contains("accuracy"), "{score}");
}

fn provenance_beside(data: &Path) -> serde_json::Value {
    let mut name = data.as_os_str().to_owned();
    name.push(".posttrain.json");
    serde_json::from_slice(&std::fs::read(name).unwrap()).unwrap()
}

#[test]
fn a_dtype_that_does_not_exist_is_refused_in_one_line() {
    let m = Micro::new("20", "4", "200");
    let line = error_line(
        &[
            "sample",
            "--model",
            s(&m.path("none")),
            "--prompt",
            "hi",
            "--weights-dtype",
            "nf5",
        ],
        &["nf5", "--weights-dtype"],
    );
    assert!(line.contains("invalid value"), "{line}");
    error_line(
        &[
            "sft",
            "--model",
            s(&m.path("none")),
            "--data",
            s(&m.task.join("train.jsonl")),
            "--out",
            s(&m.path("out")),
            "--lora-rank",
            "4",
            "--base-dtype",
            "fp4",
        ],
        &["fp4", "--base-dtype"],
    );
}
