//! A training run killed with SIGKILL at a random moment and resumed ends
//! with the checkpoint of the run that was never interrupted, bit for bit.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use crate::pipeline::Micro;
use crate::{ok, s};

/// Runs `args`, SIGKILLs it at a random moment after `state` first holds a
/// saved state, checks the output is absent, and runs `args --resume`.
fn kill_and_resume(args: &[String], state: &std::path::Path) {
    let out = std::path::PathBuf::from(&args[args.iter().position(|a| a == "--out").unwrap() + 1]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_posttrain"))
        .args(args)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let delay = Duration::from_millis(u64::from(nanos % 60));
    let start = Instant::now();
    while !state.join("state.json").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no state was saved"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(delay);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !out.exists(),
        "the run finished before it was killed ({delay:?})"
    );
    assert!(state.is_dir());
    let mut resumed = args.to_vec();
    resumed.push("--resume".into());
    run(&resumed);
    assert!(
        !state.exists(),
        "the state is removed once the output is complete"
    );
}

fn run(args: &[String]) {
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
}

/// The uninterrupted run into `whole` and the killed-and-resumed one into
/// `cut`, same arguments otherwise.
fn whole_and_resumed(
    m: &Micro,
    args: impl Fn(&std::path::Path) -> Vec<String>,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let whole = m.path("whole");
    run(&args(&whole));
    let cut = m.path("cut");
    kill_and_resume(&args(&cut), &m.path("cut.state"));
    (whole, cut)
}

/// `files` of `cut` equal `whole`'s byte for byte.
fn assert_same_files(whole: &std::path::Path, cut: &std::path::Path, files: &[&str]) {
    for f in files {
        assert_eq!(
            std::fs::read(cut.join(f)).unwrap(),
            std::fs::read(whole.join(f)).unwrap(),
            "{f} differs"
        );
    }
}

/// Metrics rows without the timing fields (`*_s`), which differ run to run.
fn rows_without_timings(dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().retain(|k, _| !k.ends_with("_s"));
            v
        })
        .collect()
}

#[test]
fn killed_and_resumed_rlhf_equals_the_uninterrupted_run() {
    let m = Micro::new("200", "8", "200");
    let policy = m.policy();
    let prompts = m.task.join("train_prompts.jsonl");
    let args = |out: &std::path::Path| -> Vec<String> {
        [
            "rlhf",
            "--policy",
            s(&policy),
            "--task-reward",
            "--prompts",
            s(&prompts),
            "--out",
            s(out),
            "--steps",
            "40",
            "--prompts-per-step",
            "8",
            "--max-new-tokens",
            "12",
            "--lr",
            "3e-3",
            "--save-state-every",
            "3",
            "--snapshot-every",
            "10",
        ]
        .map(String::from)
        .to_vec()
    };
    let (whole, cut) = whole_and_resumed(&m, args);
    // the policy, its snapshots (kept with the state) and the metrics
    assert_same_files(
        &whole,
        &cut,
        &[
            "model.safetensors",
            "snapshots/step-000010/model.safetensors",
            "snapshots/step-000030/model.safetensors",
        ],
    );
    assert_eq!(rows_without_timings(&cut), rows_without_timings(&whole));
}

#[test]
fn killed_and_resumed_reward_equals_the_uninterrupted_run() {
    let m = Micro::new("200", "8", "200");
    let policy = m.policy();
    let prefs = m.prefs(&policy);
    let args = |out: &std::path::Path| -> Vec<String> {
        [
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
            "80",
            "--batch-size",
            "8",
            "--eval-every",
            "0",
            "--save-state-every",
            "4",
        ]
        .map(String::from)
        .to_vec()
    };
    let (whole, cut) = whole_and_resumed(&m, args);
    assert_same_files(&whole, &cut, &["model.safetensors"]);
}

#[test]
fn killed_and_resumed_orpo_equals_the_uninterrupted_run() {
    let m = Micro::new("200", "8", "200");
    let policy = m.policy();
    let prefs = m.prefs(&policy);
    let args = |out: &std::path::Path| -> Vec<String> {
        [
            "orpo",
            "--policy",
            s(&policy),
            "--data",
            s(&prefs),
            "--out",
            s(out),
            "--steps",
            "80",
            "--batch-size",
            "8",
            "--grad-accum",
            "2",
            "--eval-every",
            "0",
            "--save-state-every",
            "4",
        ]
        .map(String::from)
        .to_vec()
    };
    let (whole, cut) = whole_and_resumed(&m, args);
    assert_same_files(&whole, &cut, &["model.safetensors"]);
    assert_eq!(rows_without_timings(&cut), rows_without_timings(&whole));
}

/// `sft` on the micro policy, 60 steps with state every 4, plus `extra`.
fn sft_args(m: &Micro, extra: &[&str]) -> impl Fn(&std::path::Path) -> Vec<String> {
    let (policy, data) = (m.path("policy"), m.task.join("train.jsonl"));
    let extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
    move |out: &std::path::Path| -> Vec<String> {
        let mut args: Vec<String> = [
            "sft",
            "--model",
            s(&policy),
            "--data",
            s(&data),
            "--out",
            s(out),
            "--steps",
            "60",
            "--batch-size",
            "8",
            "--eval-every",
            "0",
            "--save-state-every",
            "4",
        ]
        .map(String::from)
        .to_vec();
        args.extend(extra.iter().cloned());
        args
    }
}

#[test]
fn killed_and_resumed_sft_equals_the_uninterrupted_run() {
    let m = Micro::new("200", "8", "200");
    m.policy();
    let args = sft_args(&m, &[]);
    let (whole, cut) = whole_and_resumed(&m, &args);
    assert_same_files(&whole, &cut, &["model.safetensors"]);
    let state = m.path("cut.state");
    assert_eq!(rows_without_timings(&cut), rows_without_timings(&whole));
    assert!(
        !state.exists(),
        "the state is removed once the output is complete"
    );

    // a state written with other settings is refused, not silently used
    let mut other = args(&m.path("other"));
    let steps = other.iter().position(|a| a == "60").unwrap();
    other[steps] = "30".into();
    std::fs::create_dir_all(m.path("other.state")).unwrap();
    std::fs::copy(
        whole.join("config.json"),
        m.path("other.state").join("config.json"),
    )
    .unwrap();
    std::fs::write(
        m.path("other.state").join("state.json"),
        "{\"fingerprint\": {}, \"loop\": {}, \"ids\": {}}",
    )
    .unwrap();
    other.push("--resume".into());
    let refused = crate::posttrain(&other.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!refused.status.success());
    let err = crate::stderr(&refused);
    let line = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_default();
    assert!(
        line.contains("other.state") && line.contains("other settings or inputs"),
        "{err}"
    );
}

#[test]
fn killed_and_resumed_lora_sft_equals_the_uninterrupted_run() {
    let m = Micro::new("200", "8", "200");
    m.policy();
    let args = sft_args(&m, &["--lora-rank", "4", "--lora-dropout", "0.2"]);
    let (whole, cut) = whole_and_resumed(&m, args);
    let adapter =
        |dir: &std::path::Path| std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    assert_eq!(adapter(&cut), adapter(&whole), "resumed adapters differ");
    assert_eq!(rows_without_timings(&cut), rows_without_timings(&whole));
}

/// When the signals go to a run.
#[derive(Clone, Copy)]
pub(crate) enum When {
    /// After its first logged step (its staging directory holds a metrics
    /// row): in the step that follows, or its eval.
    AfterAStep,
    /// While `OUT.state` is being written (its staging directory exists).
    DuringAStateSave,
}

/// Waits for `when` in the run writing `out`, then sends `signals`
/// SIGTERMs 20 ms apart to the process `to(child)` names (the child itself,
/// or one of mpirun's ranks); returns the child's exit status and stderr.
pub(crate) fn terminate(
    child: std::process::Child,
    out: &std::path::Path,
    (when, signals): (When, usize),
    to: impl Fn(&std::process::Child) -> u32,
) -> (std::process::ExitStatus, String) {
    let parent = out.parent().unwrap();
    let name = out.file_name().unwrap().to_str().unwrap();
    let staging = |prefix: &str, file: Option<&str>| {
        std::fs::read_dir(parent).unwrap().flatten().any(|e| {
            e.file_name().to_string_lossy().starts_with(prefix)
                && file
                    .is_none_or(|f| std::fs::metadata(e.path().join(f)).is_ok_and(|m| m.len() > 0))
        })
    };
    let ready = || match when {
        When::AfterAStep => staging(&format!(".{name}.tmp-"), Some("metrics.jsonl")),
        When::DuringAStateSave => staging(&format!(".{name}.state.tmp-"), None),
    };
    let start = Instant::now();
    while !ready() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the moment to signal never came"
        );
        if let When::AfterAStep = when {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let pid = to(&child).to_string();
    for i in 0..signals {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(20));
        }
        let sent = Command::new("kill").args(["-TERM", &pid]).status();
        assert!(sent.unwrap().success());
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The run of `args` into `whole`, and into `cut` stopped by SIGTERM (sent
/// `signals` times at `when`) and resumed; `files` of both compared byte for
/// byte. One signal saves the state at the step it stops after; a second
/// one ends the process at once, leaving the state of the last save.
fn sigterm_and_resume(
    m: &Micro,
    stage: &str,
    args: impl Fn(&std::path::Path) -> Vec<String>,
    files: &[&str],
    (when, signals): (When, usize),
) {
    let whole = m.path("whole");
    run(&args(&whole));
    let cut = m.path("cut");
    let child = Command::new(env!("CARGO_BIN_EXE_posttrain"))
        .args(args(&cut))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (status, stderr) = terminate(child, &cut, (when, signals), Child::id);
    assert_eq!(status.code(), Some(143), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.contains("stopped "))
        .unwrap_or_default();
    let expected = match signals {
        1 => format!("{stage}: stopped by SIGTERM at step "),
        _ => format!("{stage}: stopped at once by SIGTERM at "),
    };
    // the line says where --resume will continue from, or that it starts afresh
    let state = m.path("cut.state");
    let continues = line.contains(&format!("--resume continues from {}", state.display()))
        || line.contains(&format!("state saved to {}", state.display()));
    let afresh = line.contains("no state was saved yet");
    assert!(line.starts_with(&expected), "{stderr}");
    assert!(if state.is_dir() { continues } else { afresh }, "{stderr}");
    assert!(!stderr.contains("error:"), "{stderr}");
    assert!(!cut.exists(), "no output after a stop");
    if signals == 1 {
        assert!(
            m.path("cut.state").join("state.json").is_file(),
            "the stop saved the state"
        );
    }
    let left = crate::signals::staging_left(&m.path(""));
    assert!(left.is_empty(), "staging was left: {left:?}");
    let mut resumed = args(&cut);
    resumed.push("--resume".into());
    run(&resumed);
    assert_same_files(&whole, &cut, files);
    assert_eq!(rows_without_timings(&cut), rows_without_timings(&whole));
}

fn sft_to_stop(m: &Micro, steps: &str, extra: &[&str]) -> impl Fn(&std::path::Path) -> Vec<String> {
    let policy = m.policy();
    let data = m.task.join("train.jsonl");
    let steps = steps.to_string();
    // the held-out pairs are read always, evaluated when `--eval-every` says
    let mut extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
    extra.extend(["--eval".into(), s(&m.task.join("eval.jsonl")).into()]);
    move |out: &std::path::Path| -> Vec<String> {
        let args = [
            "sft",
            "--model",
            s(&policy),
            "--data",
            s(&data),
            "--out",
            s(out),
            "--steps",
            &steps,
            "--batch-size",
            "8",
        ];
        let mut args: Vec<String> = args.map(String::from).to_vec();
        args.extend(extra.iter().cloned());
        args
    }
}

#[test]
fn sigterm_saves_the_state_and_resume_equals_the_unbroken_run() {
    let m = Micro::new("200", "8", "200");
    // no periodic state: what the resume finds is what the signal saved
    let args = sft_to_stop(&m, "400", &["--eval-every", "0", "--save-state-every", "0"]);
    let stop = (When::AfterAStep, 1);
    sigterm_and_resume(&m, "sft", args, &["model.safetensors"], stop);
}

#[test]
fn sigterm_during_an_eval_or_a_state_save_and_resume_equals_the_unbroken_run() {
    // an eval of 400 pairs each step: most of a step is its eval
    let m = Micro::new("200", "400", "200");
    let args = sft_to_stop(&m, "30", &["--eval-every", "1", "--save-state-every", "0"]);
    let files = ["model.safetensors"];
    sigterm_and_resume(&m, "sft", args, &files, (When::AfterAStep, 1));
    let m = Micro::new("200", "8", "200");
    let args = sft_to_stop(&m, "400", &["--eval-every", "0", "--save-state-every", "1"]);
    sigterm_and_resume(&m, "sft", args, &files, (When::DuringAStateSave, 1));
}

#[test]
fn a_second_sigterm_ends_the_run_at_once_and_resume_continues_from_the_last_save() {
    let m = Micro::new("200", "400", "200");
    let args = sft_to_stop(&m, "30", &["--eval-every", "1", "--save-state-every", "3"]);
    let stop = (When::AfterAStep, 2);
    sigterm_and_resume(&m, "sft", args, &["model.safetensors"], stop);
}

#[test]
fn sigterm_stops_rlhf_with_its_anchor_and_snapshots_and_resume_equals_the_unbroken_run() {
    let files = [
        "model.safetensors",
        "snapshots/step-000002/model.safetensors",
        "snapshots/step-000058/model.safetensors",
    ];
    // within a step, then while a state save (every step) is being written
    for (save_every, when) in [("0", When::AfterAStep), ("1", When::DuringAStateSave)] {
        let m = Micro::new("200", "8", "200");
        let policy = m.policy();
        let prompts = m.task.join("train_prompts.jsonl");
        let args = |out: &std::path::Path| -> Vec<String> {
            let args = [
                "rlhf",
                "--policy",
                s(&policy),
                "--task-reward",
                "--prompts",
                s(&prompts),
                "--out",
                s(out),
                "--steps",
                "60",
                "--prompts-per-step",
                "8",
                "--max-new-tokens",
                "12",
                "--lr",
                "3e-3",
                "--save-state-every",
                save_every,
                "--snapshot-every",
                "2",
            ];
            args.map(String::from).to_vec()
        };
        sigterm_and_resume(&m, "rlhf", args, &files, (when, 1));
    }
}

#[test]
fn a_truncated_or_corrupt_state_is_refused_in_one_line_naming_the_file() {
    let m = Micro::new("200", "8", "200");
    let out = m.path("out");
    let args = sft_to_stop(&m, "400", &["--eval-every", "0", "--save-state-every", "0"])(&out);
    let child = Command::new(env!("CARGO_BIN_EXE_posttrain"))
        .args(&args)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (status, _) = terminate(child, &out, (When::AfterAStep, 1), Child::id);
    assert_eq!(status.code(), Some(143));
    let state = m.path("out.state");
    let saved = m.path("saved.state");
    std::fs::rename(&state, &saved).unwrap();
    let mut resume: Vec<&str> = args.iter().map(String::as_str).collect();
    resume.push("--resume");
    for (file, needle) in [
        ("state.json", "EOF while parsing"),
        ("model.safetensors", "not a readable safetensors file"),
        ("optimizer.bpk", "not a readable optimizer state"),
    ] {
        let _ = std::fs::remove_dir_all(&state);
        std::fs::create_dir(&state).unwrap();
        for e in std::fs::read_dir(&saved).unwrap().flatten() {
            std::fs::copy(e.path(), state.join(e.file_name())).unwrap();
        }
        let broken = state.join(file);
        let bytes = std::fs::read(&broken).unwrap();
        std::fs::write(&broken, &bytes[..bytes.len().min(40)]).unwrap();
        crate::error_line(&resume, &[&format!("out.state/{file}"), needle]);
        assert!(!out.exists());
    }
}
