//! `mpirun -np 2 posttrain …` (feature `mpi`): two ranks train the weights
//! one process trains, write the data files one process writes, stop
//! together when one of them dies or mpirun is told to stop, and a state
//! saved by one number of processes resumes on another.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::pipeline::Micro;
use crate::{ok, relative_difference, s, stderr};

/// `posttrain args` on two ranks.
fn mpirun(args: &[&str]) -> Output {
    mpirun_command(args).output().expect("mpirun runs")
}

fn mpirun_command(args: &[&str]) -> Command {
    let mut c = Command::new("mpirun");
    c.args([
        "--oversubscribe",
        "-np",
        "2",
        env!("CARGO_BIN_EXE_posttrain"),
    ])
    .args(args)
    .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
    .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    // containers often forbid the cross-process memory copy Open MPI tries first
    .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
    .env_remove("POSTTRAIN_BACKEND");
    c
}

fn mpirun_ok(args: &[&str]) {
    let out = mpirun(args);
    assert!(
        out.status.success(),
        "mpirun posttrain {args:?} failed: {}",
        stderr(&out)
    );
}

/// One process into `one`, two ranks into `two`, same arguments; the
/// weights agree to 1e-5 relative and the outputs name their world size.
fn one_and_two(m: &Micro, file: &str, args: impl Fn(&Path) -> Vec<String>) -> f64 {
    let (one, two) = (m.path("one"), m.path("two"));
    let strs = |v: &[String]| v.iter().map(String::clone).collect::<Vec<_>>();
    let a = strs(&args(&one));
    ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let b = strs(&args(&two));
    mpirun_ok(&b.iter().map(String::as_str).collect::<Vec<_>>());
    let (worst, bitwise) = relative_difference(&one.join(file), &two.join(file));
    eprintln!("{file}: largest relative difference {worst:e}, bitwise equal: {bitwise}");
    assert!(
        worst < 1e-5,
        "two ranks differ from one process by {worst:e}"
    );
    for (dir, size) in [(&one, 1), (&two, 2)] {
        let p: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("posttrain.json")).unwrap()).unwrap();
        assert_eq!(p["world_size"], size, "{}", dir.display());
    }
    worst
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|a| a.to_string()).collect()
}

#[test]
fn two_ranks_distill_like_one_process() {
    let m = Micro::new("200", "8", "200");
    let policy = m.policy();
    let teacher = m.path("teacher");
    let data = m.task.join("train.jsonl");
    ok(&m.pretrain_args(
        &data,
        &teacher,
        &["--steps", "40", "--batch-size", "16", "--seed", "5"],
    ));
    let data = m.task.join("train.jsonl");
    one_and_two(&m, "model.safetensors", |out| {
        strings(&[
            "sft",
            "--model",
            s(&policy),
            "--teacher",
            s(&teacher),
            "--kd",
            "live",
            "--data",
            s(&data),
            "--out",
            s(out),
            "--steps",
            "20",
            "--batch-size",
            "8",
            "--grad-accum",
            "2",
            "--eval-every",
            "0",
            "--lr",
            "3e-3",
            // a row's samples come from its own stream, whichever rank draws them
            "--on-policy-fraction",
            "0.5",
        ])
    });
}

#[test]
fn two_ranks_train_lora_adapters_like_one_process() {
    let m = Micro::new("200", "8", "200");
    let policy = m.policy();
    let data = m.task.join("train.jsonl");
    one_and_two(&m, "adapter_model.safetensors", |out| {
        strings(&[
            "sft",
            "--model",
            s(&policy),
            "--data",
            s(&data),
            "--out",
            s(out),
            "--steps",
            "20",
            "--batch-size",
            "6",
            "--eval-every",
            "0",
            "--lr",
            "1e-2",
            "--lora-rank",
            "4",
        ])
    });
}

#[test]
fn two_ranks_train_a_reward_model_like_one_process() {
    let m = Micro::new("200", "8", "200");
    let policy = m.policy();
    let prefs = m.prefs(&policy);
    one_and_two(&m, "model.safetensors", |out| {
        strings(&[
            "reward",
            "--policy",
            s(&policy),
            "--size-ratio",
            "3",
            "--data",
            s(&prefs),
            "--out",
            s(out),
            "--steps",
            "20",
            "--batch-size",
            "8",
            "--eval-every",
            "0",
        ])
    });
}

#[test]
fn two_ranks_train_dpo_and_orpo_like_one_process() {
    let m = Micro::new("200", "8", "200");
    let policy = m.policy();
    let prefs = m.prefs(&policy);
    for (stage, lr) in [("dpo", "2e-3"), ("orpo", "1e-2")] {
        one_and_two(&m, "adapter_model.safetensors", |out| {
            strings(&[
                stage,
                "--policy",
                s(&policy),
                "--data",
                s(&prefs),
                "--out",
                s(out),
                "--overwrite",
                "--steps",
                "10",
                "--batch-size",
                "6",
                "--grad-accum",
                "2",
                "--eval-every",
                "0",
                "--lr",
                lr,
                "--lora-rank",
                "4",
            ])
        });
    }
}

fn rlhf_args(policy: &Path, prompts: &Path, steps: &str) -> impl Fn(&Path) -> Vec<String> {
    let (policy, prompts, steps) = (
        policy.to_path_buf(),
        prompts.to_path_buf(),
        steps.to_string(),
    );
    move |out: &Path| {
        strings(&[
            "rlhf",
            "--policy",
            s(&policy),
            "--task-reward",
            "--prompts",
            s(&prompts),
            "--out",
            s(out),
            "--steps",
            &steps,
            "--prompts-per-step",
            "8",
            "--samples",
            "4",
            "--anchor",
            "ema",
            "--max-new-tokens",
            "12",
            "--lr",
            "3e-3",
            "--save-state-every",
            "3",
            "--snapshot-every",
            "10",
        ])
    }
}

#[test]
fn two_ranks_rlhf_like_one_process() {
    let m = Micro::new("200", "8", "200");
    let policy = m.policy();
    let prompts = m.task.join("train_prompts.jsonl");
    one_and_two(&m, "model.safetensors", rlhf_args(&policy, &prompts, "20"));
    let (worst, _) = relative_difference(
        &m.path("one/snapshots/step-000010/model.safetensors"),
        &m.path("two/snapshots/step-000010/model.safetensors"),
    );
    assert!(worst < 1e-5, "snapshots differ by {worst:e}");
    // the metrics are the whole step's, not rank 0's share
    let last = |dir: &str| {
        let text = std::fs::read_to_string(m.path(dir).join("metrics.jsonl")).unwrap();
        let row: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        row
    };
    let (a, b) = (last("one"), last("two"));
    assert_eq!(a["samples"], 32);
    assert_eq!(a["samples"], b["samples"]);
    assert_eq!(a["tokens"], b["tokens"]);
    let close = |k: &str| (a[k].as_f64().unwrap() - b[k].as_f64().unwrap()).abs() < 1e-4;
    assert!(
        close("reward") && close("kl_init") && close("loss"),
        "{a}\n{b}"
    );
}

#[test]
fn two_ranks_write_the_data_files_one_process_writes() {
    let m = Micro::new("200", "8", "200");
    let policy = m.policy();
    let prompts = m.task.join("train_prompts.jsonl");
    let rm = m.path("rm");
    let prefs = m.prefs(&policy);
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
        "5",
        "--batch-size",
        "8",
        "--eval-every",
        "0",
    ]);
    let (one, two) = (m.path("one"), m.path("two"));
    for dir in [&one, &two] {
        std::fs::create_dir_all(dir).unwrap();
        let at = |f: &str| dir.join(f).to_str().unwrap().to_string();
        let (sample, generated, prefs, scored, eval) = (
            at("sample.jsonl"),
            at("generated.jsonl"),
            at("prefs.jsonl"),
            at("scored.jsonl"),
            at("eval.jsonl"),
        );
        let (policy, prompts, rm) = (s(&policy), s(&prompts), s(&rm));
        let commands = [
            vec![
                "sample",
                "--model",
                policy,
                "--prompts",
                prompts,
                "--max-new-tokens",
                "8",
                "--batch-size",
                "16",
                "--out",
                &sample,
            ],
            vec![
                "generate",
                "--model",
                policy,
                "--prompts",
                prompts,
                "--max-new-tokens",
                "8",
                "--batch-size",
                "16",
                "--topk",
                "4",
                "--out",
                &generated,
            ],
            vec![
                "data",
                "prefs",
                "--policy",
                policy,
                "--prompts",
                prompts,
                "--samples",
                "4",
                "--max-new-tokens",
                "12",
                "--out",
                &prefs,
            ],
            vec![
                "score",
                "--reward",
                rm,
                "--input",
                &generated,
                "--batch-size",
                "16",
                "--out",
                &scored,
            ],
            vec![
                "eval",
                "--checkpoints",
                policy,
                "--prompts",
                prompts,
                "--reward",
                rm,
                "--reference",
                policy,
                "--samples",
                "2",
                "--max-new-tokens",
                "8",
                "--out",
                &eval,
            ],
        ];
        for args in &commands {
            if dir == &one {
                ok(args);
            } else {
                mpirun_ok(args);
            }
        }
    }
    for f in [
        "sample.jsonl",
        "generated.jsonl",
        "prefs.jsonl",
        "scored.jsonl",
        "eval.jsonl",
    ] {
        let (a, b) = (
            std::fs::read(one.join(f)).unwrap(),
            std::fs::read(two.join(f)).unwrap(),
        );
        assert!(!a.is_empty(), "{f} is empty");
        assert!(a == b, "{f}: two ranks wrote other bytes than one process");
    }
}

#[test]
fn a_killed_rank_stops_the_run_and_two_ranks_resume_it() {
    let m = Micro::new("200", "8", "200");
    let policy = m.policy();
    let prompts = m.task.join("train_prompts.jsonl");
    let args = rlhf_args(&policy, &prompts, "150");
    let (whole, cut) = (m.path("whole"), m.path("cut"));
    let state = m.path("cut.state");
    let cut_args = args(&cut);
    let cut_args: Vec<&str> = cut_args.iter().map(String::as_str).collect();
    let mut run = mpirun_command(&cut_args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !state.join("state.json").exists() {
        assert!(start.elapsed() < Duration::from_secs(60), "no state saved");
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(Duration::from_millis(30));
    // the ranks are mpirun's children: kill one of them
    let rank = last_rank(&run);
    Command::new("kill")
        .args(["-9", &rank.to_string()])
        .status()
        .unwrap();
    let status = run.wait().unwrap();
    assert!(!status.success(), "the run goes on without a rank");
    assert!(!cut.exists(), "the run finished before the kill");
    assert!(state.is_dir());

    let mut alone: Vec<&str> = cut_args.clone();
    alone.push("--resume");
    mpirun_ok(&alone);
    assert!(
        !state.exists(),
        "the state is removed with the output written"
    );
    let whole_args = args(&whole);
    mpirun_ok(&whole_args.iter().map(String::as_str).collect::<Vec<_>>());
    for f in [
        "model.safetensors",
        "snapshots/step-000010/model.safetensors",
    ] {
        assert!(
            std::fs::read(cut.join(f)).unwrap() == std::fs::read(whole.join(f)).unwrap(),
            "{f}: resumed differs from the unbroken run"
        );
    }
}

#[test]
fn ranks_refuse_what_they_cannot_split_and_commands_that_do_not_split() {
    let m = Micro::new("100", "8", "200");
    let policy: PathBuf = m.policy();
    let data = m.task.join("train.jsonl");
    let out = m.path("out");
    let bad = mpirun(&[
        "sft",
        "--model",
        s(&policy),
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--batch-size",
        "7",
    ]);
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("--batch-size of 7 is not divisible by the 2 ranks"),
        "{}",
        stderr(&bad)
    );
    assert!(!out.exists());
    let bad = mpirun(&["inspect", s(&policy)]);
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("does not run data-parallel"));
}

/// Waits until the run writing `out` has logged a step, then sends SIGTERM
/// to the process `to(child)` names; returns the exit code and stderr.
fn terminate_after_a_step(
    child: std::process::Child,
    out: &Path,
    to: impl Fn(&std::process::Child) -> u32,
) -> (Option<i32>, String) {
    let once = (crate::resume::When::AfterAStep, 1);
    let (status, stderr) = crate::resume::terminate(child, out, once, to);
    (status.code(), stderr)
}

/// The last rank mpirun started.
fn last_rank(mpirun: &std::process::Child) -> u32 {
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", mpirun.id()))
        .unwrap_or_default();
    let last = children.split_whitespace().last();
    last.expect("mpirun started its ranks").parse().unwrap()
}

/// The steps the "stopped by SIGTERM at step N" lines of `stderr` name.
fn stopped_steps(stderr: &str) -> Vec<usize> {
    stderr
        .lines()
        .filter_map(|l| l.split("stopped by SIGTERM at step ").nth(1))
        .map(|rest| rest.split(';').next().unwrap().parse().unwrap())
        .collect()
}

fn assert_within_1e5(a: &Path, b: &Path) {
    let (worst, bitwise) = relative_difference(a, b);
    eprintln!(
        "{}: largest relative difference {worst:e}, bitwise equal: {bitwise}",
        a.display()
    );
    assert!(worst < 1e-5, "{}: differs by {worst:e}", a.display());
}

/// A LoRA sft of `m`'s policy into `out`, long enough to be stopped.
fn lora_sft(m: &Micro) -> impl Fn(&Path, &str) -> Vec<String> {
    let (policy, data) = (m.policy(), m.task.join("train.jsonl"));
    move |out: &Path, dropout: &str| {
        strings(&[
            "sft",
            "--model",
            s(&policy),
            "--data",
            s(&data),
            "--out",
            s(out),
            "--steps",
            "80",
            "--batch-size",
            "8",
            "--grad-accum",
            "2",
            "--lora-rank",
            "4",
            "--lora-dropout",
            dropout,
            "--lr",
            "3e-3",
            "--eval-every",
            "0",
            "--save-state-every",
            "0",
        ])
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

const ADAPTER: &str = "adapter_model.safetensors";

#[test]
fn sigterm_to_one_rank_stops_both_after_one_step_and_one_process_resumes_it() {
    let m = Micro::new("200", "8", "200");
    let args = lora_sft(&m);
    let (whole, cut) = (m.path("whole"), m.path("cut"));
    mpirun_ok(&strs(&args(&whole, "0")));
    let cut_args = args(&cut, "0");
    let run = mpirun_command(&strs(&cut_args))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // the signal reaches one rank; the other learns of it in the step's sum
    let (code, err) = terminate_after_a_step(run, &cut, last_rank);
    assert_ne!(code, Some(0), "{err}");
    // mpirun ends the job when the first rank exits: the other's line may
    // not come, its state is saved before either exits
    let steps = stopped_steps(&err);
    assert!(!steps.is_empty(), "no stop line: {err}");
    assert!(steps.iter().all(|&s| s == steps[0]), "{err}");
    assert!(!cut.exists());
    assert!(m.path("cut.state").join("state.json").is_file());
    assert!(crate::signals::staging_left(&m.path("")).is_empty());

    let mut alone = cut_args.clone();
    alone.push("--resume".into());
    let out = crate::posttrain(&strs(&alone));
    assert!(out.status.success(), "{}", stderr(&out));
    let said = stderr(&out);
    assert!(
        said.contains("saved by 2 process(es), continued by 1"),
        "{said}"
    );
    assert_within_1e5(&whole.join(ADAPTER), &cut.join(ADAPTER));
}

#[test]
fn a_state_of_one_process_resumes_on_two_ranks_unless_lora_dropout_draws_per_rank() {
    let m = Micro::new("200", "8", "200");
    let args = lora_sft(&m);
    let stop = |out: &Path, dropout: &str| {
        let child = Command::new(env!("CARGO_BIN_EXE_posttrain"))
            .args(args(out, dropout))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (code, stderr) = terminate_after_a_step(child, out, std::process::Child::id);
        assert_eq!(code, Some(143), "{stderr}");
        assert_eq!(stopped_steps(&stderr).len(), 1, "{stderr}");
    };
    let (whole, cut) = (m.path("whole"), m.path("cut"));
    crate::ok(&strs(&args(&whole, "0")));
    stop(&cut, "0");
    let mut resumed = args(&cut, "0");
    resumed.push("--resume".into());
    mpirun_ok(&strs(&resumed));
    assert_within_1e5(&whole.join(ADAPTER), &cut.join(ADAPTER));

    let dropped = m.path("dropped");
    stop(&dropped, "0.1");
    let mut resumed = args(&dropped, "0.1");
    resumed.push("--resume".into());
    let out = mpirun(&strs(&resumed));
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("dropped.state")
            && err.contains("written by a run of 1 process(es), this one has 2")
            && err.contains("--lora-dropout"),
        "{err}"
    );
}
