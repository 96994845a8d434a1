//! Sampling and the CLI's contracts: reproducible seeds, refusing to
//! overwrite, clear errors for unusable flags.

use crate::{fails, fixture, ok, posttrain, s};

fn prompts(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("prompts.jsonl");
    std::fs::write(
        &path,
        "{\"prompt\": \"What is two plus three?\"}\n{\"prompt\": \"Reverse the word <start_of_turn>.\"}\n{\"messages\": [{\"role\": \"user\", \"content\": \"Name a color.\"}]}\n",
    )
    .unwrap();
    path
}

fn sample(dir: &std::path::Path, name: &str, extra: &[&str]) -> Vec<serde_json::Value> {
    let out = dir.join(name);
    let p = prompts(dir);
    let model = fixture();
    let mut args = vec![
        "sample",
        "--model",
        s(&model),
        "--prompts",
        s(&p),
        "--out",
        s(&out),
    ];
    args.extend_from_slice(extra);
    ok(&args);
    std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn sampling_is_reproducible_and_seeded() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--max-new-tokens", "12", "--seed", "5", "--batch-size", "2"];
    let a = sample(dir.path(), "a.jsonl", &args);
    let b = sample(dir.path(), "b.jsonl", &args);
    assert_eq!(a.len(), 3);
    assert_eq!(a, b, "same seed, same samples");
    // one prompt per batch gives the same rows: each prompt has its own stream
    let c = sample(
        dir.path(),
        "c.jsonl",
        &["--max-new-tokens", "12", "--seed", "5", "--batch-size", "1"],
    );
    assert_eq!(a, c);
    let d = sample(
        dir.path(),
        "d.jsonl",
        &["--max-new-tokens", "12", "--seed", "6"],
    );
    assert_ne!(a, d, "another seed, other samples");
    for row in &a {
        assert!(row["completion_tokens"].as_u64().unwrap() <= 12);
        assert!(row["prompt"].is_string() && row["completion"].is_string());
    }
    assert_eq!(a[1]["prompt"], "Reverse the word <start_of_turn>.");
}

/// `--sample-on device` on the CPU: the Gumbel-max draw is seeded per prompt
/// as the host's is, greedy decoding is the same argmax, and a data file's
/// provenance says where its samples were drawn.
#[test]
fn device_sampling_is_seeded_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let on_device = |seed: &'static str| {
        vec![
            "--max-new-tokens",
            "12",
            "--seed",
            seed,
            "--sample-on",
            "device",
        ]
    };
    let a = sample(dir.path(), "a.jsonl", &on_device("5"));
    let b = sample(
        dir.path(),
        "b.jsonl",
        &[on_device("5"), vec!["--batch-size", "1"]].concat(),
    );
    assert_eq!(a, b, "each prompt has its own stream on the device too");
    assert_ne!(
        a,
        sample(dir.path(), "c.jsonl", &on_device("6")),
        "another seed, other samples"
    );
    let greedy = ["--max-new-tokens", "12", "--temperature", "0"];
    let host = sample(dir.path(), "host.jsonl", &greedy);
    let device = sample(
        dir.path(),
        "device.jsonl",
        &[&greedy[..], &["--sample-on", "device"]].concat(),
    );
    assert_eq!(host, device, "greedy decoding is the same argmax");

    let (model, prompts) = (fixture(), prompts(dir.path()));
    let place = |extra: &[&str]| -> String {
        let out = dir.path().join(format!("generated-{}.jsonl", extra.len()));
        let args = [
            &[
                "generate",
                "--model",
                s(&model),
                "--prompts",
                s(&prompts),
                "--out",
                s(&out),
            ][..],
            &["--max-new-tokens", "4", "--topk", "2"],
            extra,
        ]
        .concat();
        ok(&args);
        let mut name = out.into_os_string();
        name.push(".posttrain.json");
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(name).unwrap()).unwrap();
        v["sample_on"].as_str().unwrap().to_string()
    };
    assert_eq!(place(&[]), "host");
    assert_eq!(place(&["--sample-on", "device"]), "device");
}

#[test]
fn greedy_sampling_with_one_prompt_on_stdout() {
    let out = ok(&[
        "sample",
        "--model",
        s(&fixture()),
        "--prompt",
        "Hello",
        "--temperature",
        "0",
        "--max-new-tokens",
        "8",
    ]);
    let row: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(row["prompt"], "Hello");
}

#[test]
fn existing_output_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    std::fs::write(&out, "precious\n").unwrap();
    fails(
        &[
            "sample",
            "--model",
            s(&fixture()),
            "--prompt",
            "Hi",
            "--out",
            s(&out),
        ],
        &["out.jsonl", "already exists", "--overwrite"],
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "precious\n");
}

#[test]
fn bad_prompt_rows_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.jsonl");
    std::fs::write(&p, "{\"prompt\": \"fine\"}\n{\"prompt\": 7}\n").unwrap();
    fails(
        &["sample", "--model", s(&fixture()), "--prompts", s(&p)],
        &["bad.jsonl:2", "`prompt` must be a string"],
    );
}

#[test]
fn prompt_longer_than_the_context_is_refused() {
    let long = "word ".repeat(400);
    fails(
        &["sample", "--model", s(&fixture()), "--prompt", &long],
        &["prompt 1", "exceed the model's context of 256"],
    );
}

#[test]
fn tokenizer_larger_than_the_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = crate::fixture_copy(dir.path());
    crate::big_tokenizer(&ckpt);
    fails(
        &["sample", "--model", s(&ckpt), "--prompt", "Hi"],
        &[
            "tokenizer.json: tokenizer has 300 tokens",
            "sets vocab_size 256",
        ],
    );
}

#[test]
fn backend_not_compiled_in_is_explained() {
    if cfg!(feature = "cuda") {
        return;
    }
    fails(
        &[
            "--backend",
            "cuda",
            "sample",
            "--model",
            s(&fixture()),
            "--prompt",
            "Hi",
        ],
        &["cuda", "--features cuda"],
    );
}

#[test]
fn unknown_flag_values_are_refused() {
    let out = posttrain(&["--backend", "tpu", "inspect", s(&fixture())]);
    assert!(!out.status.success());
    let out = posttrain(&[
        "sample",
        "--model",
        s(&fixture()),
        "--prompt",
        "x",
        "--top-p",
        "0",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--top-p"));
}

#[test]
fn every_subcommand_has_help() {
    for sub in [
        vec!["inspect"],
        vec!["sample"],
        vec!["logits"],
        vec!["convert"],
        vec!["bench"],
        vec!["tokenizer", "train"],
    ] {
        let mut args = sub.clone();
        args.push("--help");
        let text = ok(&args);
        assert!(text.contains("Usage:"), "{sub:?}");
    }
    assert!(ok(&["sample", "--help"]).contains("[default: 64]"));
}

#[test]
fn synth_refuses_an_empty_number_range() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("task");
    fails(
        &["data", "synth", "--out", s(&out), "--max-number", "0"],
        &["--max-number"],
    );
    assert!(!out.exists());
}

#[cfg(not(feature = "mpi"))]
#[test]
fn a_build_without_mpi_refuses_to_run_as_one_of_several_ranks() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_posttrain"))
        .args(["inspect", crate::s(&crate::fixture())])
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: ")
            && err.contains("built without MPI")
            && err.contains("--features mpi"),
        "{err}"
    );
}
