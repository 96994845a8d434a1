//! The embedded Makefile end to end on a micro configuration: every stage's
//! output exists, each consumed its parent (lineage), and a second `make`
//! does nothing.

use std::path::Path;
use std::process::Command;

use crate::{ok, s};

fn make(dir: &Path, run: &Path, extra: &[String]) -> std::process::Output {
    make_file("examples/embedded/Makefile", dir, run, extra)
}

fn make_file(file: &str, dir: &Path, run: &Path, extra: &[String]) -> std::process::Output {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cmd = Command::new("make");
    cmd.arg("-f")
        .arg(root.join(file))
        .arg(format!("RUN={}", run.display()))
        .arg(format!("POSTTRAIN={}", env!("CARGO_BIN_EXE_posttrain")))
        .arg("BUILD=true")
        .args(extra)
        .current_dir(dir)
        .env_remove("POSTTRAIN_BACKEND")
        .env_remove("MAKEFLAGS");
    cmd.output().expect("make runs")
}

/// Small enough for seconds: a short task, few steps, the micro student.
fn micro_flags() -> Vec<String> {
    [
        "SYNTH_FLAGS=--vocab-size 128 --train 120 --eval 12",
        "TEACHER_FLAGS=--steps 12 --batch-size 16 --eval-every 0",
        "GENERATE_FLAGS=--temperature 0 --max-new-tokens 12 --batch-size 64 --topk 4",
        "SFT_FLAGS=--steps 8 --batch-size 16 --kd topk --alpha 0.5 --eval-every 0",
        "PREFS_FLAGS=--samples 2 --max-new-tokens 12",
        "RM_FLAGS=--size-ratio 3 --steps 6 --batch-size 8",
        "RLHF_FLAGS=--steps 4 --prompts-per-step 4 --max-new-tokens 12 --snapshot-every 2",
        "EVAL_FLAGS=--samples 1 --max-new-tokens 12",
    ]
    .iter()
    .map(|f| f.to_string())
    .collect()
}

#[test]
fn embedded_makefile_runs_every_stage() {
    if Command::new("make").arg("--version").output().is_err() {
        panic!("GNU make is needed for this test (apt-get install make)");
    }
    let tmp = tempfile::tempdir().unwrap();
    let keep = std::env::var_os("POSTTRAIN_KEEP_RUN");
    let run = match &keep {
        Some(dir) => std::path::PathBuf::from(dir),
        None => tmp.path().join("run"),
    };
    let out = make(tmp.path(), &run, &micro_flags());
    assert!(
        out.status.success(),
        "make failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "task/train_prompts.jsonl",
        "teacher/model.safetensors",
        "sft_pairs.jsonl",
        "student_init/model.safetensors",
        "sft/model.safetensors",
        "prefs.jsonl",
        "prefs_eval.jsonl",
        "rm/model.safetensors",
        "warp/it1/rl-s0/snapshots/step-000002/model.safetensors",
        "warp/it1/rl-s1/metrics.jsonl",
        "warp/it1/sft-anchor/posttrain.json",
        "warp/it1/merge/eta-0.30/model.safetensors",
        "warp/it2/rl-s0/model.safetensors",
        "warp/it2/merge/eta-1.00/model.safetensors",
        "warp/eval.jsonl",
        "warp/eval.jsonl.posttrain.json",
        "report/index.html",
        "report/pareto_reward_1.png",
    ] {
        assert!(run.join(f).is_file(), "{f} missing");
    }
    // each stage consumed its parent: the last merge's lineage reaches the task
    let inspect = ok(&["inspect", s(&run.join("warp/it2/merge/eta-0.30"))]);
    for stage in [
        "warp-merge",
        "rlhf",
        "reward",
        "sft",
        "init",
        "pretrain",
        "generate",
        "data-prefs",
        "data-synth",
    ] {
        assert!(
            inspect.contains(&format!(" {stage} ")),
            "{stage} in {inspect}"
        );
    }
    assert!(inspect.contains("it1/merge/eta-0.30") && inspect.contains("sft_pairs.jsonl"));
    assert!(!inspect.contains("[changed]") && !inspect.contains("[missing]"));
    // the eval table: teacher, SFT policy, 5 runs with one snapshot each, 2 x 5 LITI points
    let rows = std::fs::read_to_string(run.join("warp/eval.jsonl")).unwrap();
    assert_eq!(rows.lines().count(), 2 + 5 * 2 + 2 * 5);
    // the report names runs relative to the run directory, not by absolute path
    let svg = std::fs::read_to_string(run.join("report/pareto_reward_1.svg")).unwrap();
    let name = run.file_name().unwrap().to_str().unwrap();
    assert!(svg.contains(&format!("RL: {name}/warp/it1/rl-s0")), "{svg}");
    assert!(
        !svg.contains(run.to_str().unwrap()),
        "an absolute path in the legend"
    );
    // nothing left to do
    let again = make(tmp.path(), &run, &micro_flags());
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(again.status.success());
    assert!(!stdout.contains("posttrain "), "re-made: {stdout}");
    // deleting one stage's output re-makes it and what depends on it only
    std::fs::remove_file(run.join("warp/eval.jsonl")).unwrap();
    let redo = make(tmp.path(), &run, &micro_flags());
    let stdout = String::from_utf8_lossy(&redo.stdout);
    assert!(
        stdout.contains(" eval ") && stdout.contains(" report "),
        "{stdout}"
    );
    assert!(
        !stdout.contains(" rlhf ") && !stdout.contains(" pretrain "),
        "{stdout}"
    );
}

/// Pairs, preferences and prompts on a few topics, written into `dir`.
fn own_data(dir: &Path) -> (String, String, String) {
    let write = |name: &str, rows: Vec<serde_json::Value>| {
        let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
        std::fs::write(dir.join(name), text).unwrap();
        name.to_string()
    };
    let topics = [
        "tea", "rain", "maps", "bread", "music", "boats", "stars", "salt",
    ];
    let pairs = write(
        "pairs.jsonl",
        topics
            .iter()
            .map(|t| serde_json::json!({"prompt": format!("Say one thing about {t}."), "completion": format!("People like {t}.")}))
            .collect(),
    );
    let prefs = write(
        "prefs.jsonl",
        topics
            .iter()
            .map(|t| serde_json::json!({"prompt": format!("Say one thing about {t}."), "chosen": format!("People like {t}."), "rejected": "No."}))
            .collect(),
    );
    let prompts = write(
        "prompts.jsonl",
        topics
            .iter()
            .map(|t| serde_json::json!({"prompt": format!("Tell me about {t}.")}))
            .collect(),
    );
    (pairs, prefs, prompts)
}

#[test]
fn own_model_makefile_on_the_fixture() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (pairs, prefs, prompts) = own_data(dir);
    let run = dir.join("run");
    let flags: Vec<String> = [
        format!("BASE={}", crate::fixture().display()),
        // the teacher's top-k answers, the teacher and reward model in nf4
        format!("TEACHER={}", crate::fixture().display()),
        "GEN_FLAGS=--topk 4 --temperature 0 --max-new-tokens 8".into(),
        format!("SFT_DATA={pairs}"),
        format!("PREFS={prefs}"),
        format!("PROMPTS={prompts}"),
        "SFT_FLAGS=--steps 4 --batch-size 4 --eval-every 0".into(),
        "RM_FLAGS=--steps 4 --batch-size 4".into(),
        "RLHF_FLAGS=--steps 2 --prompts-per-step 2 --max-new-tokens 8".into(),
        "EVAL_FLAGS=--samples 1 --max-new-tokens 8".into(),
    ]
    .into();
    let out = make_file("examples/own/Makefile", dir, &run, &flags);
    assert!(
        out.status.success(),
        "make failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "sft/model.safetensors",
        "rm/model.safetensors",
        "warp/it2/merge/eta-0.30/model.safetensors",
        "warp/eval.jsonl",
        "report/index.html",
    ] {
        assert!(run.join(f).is_file(), "{f} missing");
    }
    let rows = std::fs::read_to_string(run.join("warp/eval.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(rows.lines().next().unwrap()).unwrap();
    assert!(first["score"].is_null(), "no task scorer for these prompts");
    assert!(first["reward"].as_f64().unwrap().is_finite());
    let inspect = ok(&["inspect", s(&run.join("rm"))]);
    assert!(
        inspect.contains("gemma2-tiny") && inspect.contains("pairs.jsonl"),
        "{inspect}"
    );
}

#[test]
fn gemma2_2b_makefile_runs_its_lora_chain_on_the_fixture() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (pairs, prefs, prompts) = own_data(dir);
    let run = dir.join("run");
    let flags: Vec<String> = [
        format!("BASE={}", crate::fixture().display()),
        // the teacher's top-k answers, the teacher and reward model in nf4
        format!("TEACHER={}", crate::fixture().display()),
        "GEN_FLAGS=--topk 4 --temperature 0 --max-new-tokens 8".into(),
        format!("SFT_DATA={pairs}"),
        format!("PREFS={prefs}"),
        format!("PROMPTS={prompts}"),
        "LORA=--lora-rank 4 --lora-alpha 8".into(),
        "SFT_FLAGS=--steps 4 --batch-size 4 --eval-every 0 --eval-samples 0".into(),
        "RM_FLAGS=--steps 4 --batch-size 4".into(),
        "RLHF_FLAGS=--steps 2 --prompts-per-step 2 --max-new-tokens 8 --lora-rank 4 --lora-alpha 8"
            .into(),
        "ITERATIONS=2".into(),
        "EVAL_FLAGS=--samples 1 --max-new-tokens 8".into(),
    ]
    .into();
    let out = make_file("examples/gemma2-2b/Makefile", dir, &run, &flags);
    assert!(
        out.status.success(),
        "make failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let held = |dir: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(run.join(dir).join("posttrain.json")).unwrap())
            .unwrap()
    };
    assert_eq!(held("rm")["held"]["base"], "nf4");
    assert_eq!(held("warp/it1/rl-s0")["held"]["reward"], "nf4");
    let pairs = std::fs::read_to_string(run.join("teacher_pairs.jsonl")).unwrap();
    assert!(pairs.contains("teacher_topk_ids"), "{pairs}");
    for f in [
        "sft/adapter_config.json",
        "rm/adapter_config.json",
        "warp/it1/rl-s0/adapter_config.json",
        "warp/it1/merge/eta-0.30/adapter_config.json",
        "warp/it2/rl-s1/adapter_config.json",
        "warp/it2/merge/eta-1.00/adapter_config.json",
        "warp/eval.jsonl",
        "report/index.html",
    ] {
        assert!(run.join(f).is_file(), "{f} missing");
    }
    // the merged adapters have rank 2 × 4 (two seeds)
    let config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(run.join("warp/it1/merge/eta-0.30/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["r"], 8);
    let rows = std::fs::read_to_string(run.join("warp/eval.jsonl")).unwrap();
    assert!(rows.lines().count() > 5);
    assert!(
        !make_file("examples/gemma2-2b/Makefile", dir, &run, &flags)
            .stdout
            .windows(9)
            .any(|w| w == b"posttrain"),
        "a second make does nothing"
    );
}
