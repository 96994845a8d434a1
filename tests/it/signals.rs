//! What a signal or a failed write leaves: the old output whole, no
//! staging file or directory, one line naming what was not written, and
//! 128 + the signal (or 1) as the exit status.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::pipeline::Micro;
use crate::{ok, s};

/// The names in `dir` that a write stages under (`.NAME.tmp-*`,
/// `.posttrain-*`).
pub(crate) fn staging_left(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-") || n.starts_with(".posttrain-"))
        .collect()
}

/// Runs `args`, sends SIGTERM after `after`, and returns the exit code and
/// stderr.
fn terminated(args: &[&str], after: Duration) -> (Option<i32>, String) {
    let child = Command::new(env!("CARGO_BIN_EXE_posttrain"))
        .args(args)
        .env_remove("POSTTRAIN_BACKEND")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(after);
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code(), stderr)
}

/// The stderr line of a stop by SIGTERM.
fn stop_line(stderr: &str) -> &str {
    stderr
        .lines()
        .find(|l| l.contains("stopped by SIGTERM"))
        .unwrap_or_else(|| panic!("no stop line: {stderr}"))
}

fn data_stage_stops_at_once(m: &Micro, stage: &str, args: impl Fn(&Path) -> Vec<String>) {
    let out = m.path(&format!("{}.jsonl", stage.replace(' ', "-")));
    let quick = args(&out);
    let mut quick: Vec<&str> = quick.iter().map(String::as_str).collect();
    let prompts = quick.iter().position(|a| *a == "--prompts").unwrap() + 1;
    let few = m.task.join("eval_prompts.jsonl");
    quick[prompts] = s(&few);
    ok(&quick);
    let before = std::fs::read(&out).unwrap();
    let long = args(&out);
    let mut long: Vec<&str> = long.iter().map(String::as_str).collect();
    long.push("--overwrite");
    let (code, stderr) = terminated(&long, Duration::from_millis(700));
    assert_eq!(code, Some(143), "{stage} ended otherwise: {stderr}");
    let line = stop_line(&stderr);
    assert!(
        line.starts_with(&format!("{stage}: stopped by SIGTERM"))
            && line.contains(&format!("not written: {}", out.display())),
        "{line}"
    );
    eprintln!("{line}");
    assert!(!stderr.contains("error:"), "{stderr}");
    assert_eq!(
        std::fs::read(&out).unwrap(),
        before,
        "the old output changed"
    );
    assert_eq!(staging_left(&m.path("")), Vec::<String>::new());
}

#[test]
fn sigterm_stops_a_data_stage_at_once_and_leaves_its_old_output() {
    let m = Micro::new("30000", "8", "200");
    let policy = m.policy();
    let prompts = m.task.join("train_prompts.jsonl");
    let common = |out: &Path| -> Vec<String> {
        [
            "--prompts",
            s(&prompts),
            "--out",
            s(out),
            "--max-new-tokens",
            "64",
            "--temperature",
            "2.0",
        ]
        .map(String::from)
        .to_vec()
    };
    let commands: [(&str, &[&str]); 4] = [
        ("generate", &["generate", "--model"]),
        ("data prefs", &["data", "prefs", "--policy"]),
        ("sample", &["sample", "--model"]),
        ("eval", &["eval", "--checkpoints"]),
    ];
    for (stage, head) in commands {
        data_stage_stops_at_once(&m, stage, |out| {
            let mut a: Vec<String> = head.iter().map(|h| h.to_string()).collect();
            a.push(s(&policy).into());
            a.extend(common(out));
            a
        });
    }
}

/// `posttrain args` with writes limited to `kib` KiB and SIGXFSZ ignored,
/// so a write past the limit fails with EFBIG as a full disk fails one.
fn with_file_size_limit(args: &[&str], kib: u64) -> (Option<i32>, String) {
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("trap '' XFSZ; ulimit -f {kib}; exec \"$@\""))
        .arg("bash")
        .arg(env!("CARGO_BIN_EXE_posttrain"))
        .args(args)
        .env_remove("POSTTRAIN_BACKEND")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn file_bytes(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files: Vec<_> = walk(dir)
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    files.sort();
    files
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    if dir.is_file() {
        return vec![dir.to_path_buf()];
    }
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .flat_map(|e| walk(&e.path()))
        .collect()
}

/// One `error:` line naming `target` and the reason; the old output whole
/// and nothing staged beside it.
fn refused_cleanly(code: Option<i32>, stderr: &str, target: &Path, before: &[(PathBuf, Vec<u8>)]) {
    assert_eq!(code, Some(1), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    eprintln!("{}", errors[0]);
    assert!(
        errors[0].contains(&target.display().to_string())
            && errors[0].contains("File too large")
            && !errors[0].contains(".tmp-")
            && !errors[0].contains(".posttrain-"),
        "{}",
        errors[0]
    );
    assert_eq!(file_bytes(target), before, "the old output changed");
    assert_eq!(staging_left(target.parent().unwrap()), Vec::<String>::new());
}

#[test]
fn a_write_past_the_file_size_limit_leaves_the_old_output_and_no_staging() {
    let m = Micro::new("200", "8", "200");
    let policy = m.policy();
    let data = m.task.join("train.jsonl");
    // a checkpoint: its metrics fit under the limit, its weights do not
    let out = m.path("sft");
    let args = |steps: &'static str| {
        let mut a = vec![
            "sft",
            "--model",
            s(&policy),
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--steps",
            steps,
            "--eval-every",
            "0",
        ];
        a.push("--overwrite");
        a
    };
    ok(&args("2"));
    let before = file_bytes(&out);
    let weights = std::fs::metadata(out.join("model.safetensors"))
        .unwrap()
        .len();
    let (code, stderr) = with_file_size_limit(&args("3"), weights / 1024 / 2);
    refused_cleanly(code, &stderr, &out, &before);

    // a data file
    let prompts = m.task.join("train_prompts.jsonl");
    let out = m.path("generated.jsonl");
    let args = |prompts: &Path| {
        vec![
            "generate",
            "--model",
            s(&policy),
            "--prompts",
            s(prompts),
            "--out",
            s(&out),
            "--overwrite",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>()
    };
    let few = args(&m.task.join("eval_prompts.jsonl"));
    ok(&few.iter().map(String::as_str).collect::<Vec<_>>());
    let before = file_bytes(&out);
    let many = args(&prompts);
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let (code, stderr) = with_file_size_limit(&many, 4);
    refused_cleanly(code, &stderr, &out, &before);
}
