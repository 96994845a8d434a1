//! End-to-end tests that run the `posttrain` binary, each in its own temp dir.

mod bad_inputs;
mod checkpoints;
mod cli;
mod determinism;
mod dpo;
mod lora;
mod makefile;
#[cfg(feature = "mpi")]
mod mpi;
mod orpo;
mod padding;
mod pipeline;
mod quantized;
pub(crate) mod resume;
mod rlhf;
pub(crate) mod signals;
#[cfg(feature = "wgpu-tests")]
mod wgpu;

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

/// Runs and expects failure with exactly one `error:` line holding every
/// one of `needles` (a stage may have printed what it was about to do, and
/// clap adds a hint after its error line); returns that line and stderr.
fn failure(args: &[&str], needles: &[&str]) -> (String, String) {
    let out = posttrain(args);
    assert!(!out.status.success(), "posttrain {args:?} should fail");
    let err = stderr(&out);
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "one error line expected, got: {err}");
    for n in needles {
        assert!(
            errors[0].contains(n),
            "{:?} does not mention {n:?}",
            errors[0]
        );
    }
    (errors[0].to_string(), err)
}

/// See [`failure`]; returns the error line.
pub fn error_line(args: &[&str], needles: &[&str]) -> String {
    failure(args, needles).0
}

/// Like [`error_line`], and stderr holds nothing else.
pub fn fails(args: &[&str], needles: &[&str]) -> String {
    let (line, err) = failure(args, needles);
    let lines = err.lines().filter(|l| !l.trim().is_empty()).count();
    assert_eq!(lines, 1, "one line expected, got: {err}");
    line
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

/// The f32 tensors of a safetensors file, by name.
pub fn safetensors_f32(file: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let v = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (name, v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The largest difference of two runs' tensors relative to the tensor's
/// largest magnitude; also whether every bit is equal.
pub fn relative_difference(a: &Path, b: &Path) -> (f64, bool) {
    let (a, b) = (safetensors_f32(a), safetensors_f32(b));
    assert_eq!(
        a.iter().map(|t| &t.0).collect::<Vec<_>>(),
        b.iter().map(|t| &t.0).collect::<Vec<_>>()
    );
    let mut worst = 0f64;
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        let scale = x
            .iter()
            .fold(0f64, |m, v| m.max(f64::from(v.abs())))
            .max(1e-12);
        for (p, q) in x.iter().zip(y) {
            assert!(p.is_finite() && q.is_finite(), "{name}");
            worst = worst.max(f64::from((p - q).abs()) / scale);
        }
    }
    (worst, a == b)
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Replaces the checkpoint's tokenizer.json by one of 300 tokens (the
/// fixture's vocabulary has 256).
pub fn big_tokenizer(dir: &Path) {
    let corpus = dir.join("corpus.txt");
    std::fs::write(
        &corpus,
        include_str!("../fixtures/gemma2-tiny/tokenizer-corpus.txt"),
    )
    .unwrap();
    ok(&[
        "tokenizer",
        "train",
        "--input",
        s(&corpus),
        "--vocab-size",
        "300",
        "--out",
        s(&dir.join("tokenizer.json")),
        "--overwrite",
    ]);
}
