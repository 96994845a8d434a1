//! End-to-end tests that run the `posttrain` binary, each in its own temp dir.

mod bad_inputs;
mod checkpoints;
mod cli;
mod determinism;
mod makefile;
mod pipeline;
mod resume;
mod rlhf;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gemma2-tiny")
}

pub fn posttrain(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_posttrain"))
        .args(args)
        .env_remove("POSTTRAIN_BACKEND")
        .output()
        .expect("posttrain runs")
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs and expects success; returns stdout.
pub fn ok(args: &[&str]) -> String {
    let out = posttrain(args);
    assert!(
        out.status.success(),
        "posttrain {args:?} failed: {}",
        stderr(&out)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs and expects failure with a single-line message containing every
/// one of `needles`; returns that line.
pub fn fails(args: &[&str], needles: &[&str]) -> String {
    let out = posttrain(args);
    assert!(!out.status.success(), "posttrain {args:?} should fail");
    let err = stderr(&out);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected, got: {err}");
    for n in needles {
        assert!(
            lines[0].contains(n),
            "{:?} does not mention {n:?}",
            lines[0]
        );
    }
    lines[0].to_string()
}

/// A copy of the fixture checkpoint to break.
pub fn fixture_copy(dir: &Path) -> PathBuf {
    let to = dir.join("ckpt");
    std::fs::create_dir_all(&to).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture().join(f), to.join(f)).unwrap();
    }
    to
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
