//! The bad-input matrix: each broken input makes the binary exit non-zero
//! with one line naming the file, row or tensor, and leaves the outputs that
//! existed before byte for byte as they were (every case that writes is
//! pointed at them with --overwrite).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::checkpoints::{edit_config, rewrite};
use crate::{fixture, ok, posttrain, s, stderr};

/// Runs and expects failure with exactly one `error:` line holding every
/// needle (a stage may have printed what it was about to do, and clap adds
/// a hint after its error line).
fn fails(args: &[&str], needles: &[&str]) {
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
}

/// Every file under `dir` (or the file itself) with its bytes.
fn snapshot(path: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    if path.is_file() {
        out.insert(path.to_path_buf(), std::fs::read(path).unwrap());
    } else if path.is_dir() {
        for e in std::fs::read_dir(path).unwrap() {
            out.extend(snapshot(&e.unwrap().path()));
        }
    }
    out
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A copy of the fixture checkpoint, broken by `edit`.
fn broken(dir: &Path, name: &str, edit: impl FnOnce(&Path)) -> PathBuf {
    let to = dir.join(name);
    std::fs::create_dir_all(&to).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture().join(f), to.join(f)).unwrap();
    }
    edit(&to);
    to
}

fn parquet(path: &Path, prompt: polars::prelude::Column, other: Option<polars::prelude::Column>) {
    use polars::prelude::*;
    let mut cols = vec![prompt];
    cols.extend(other);
    let mut df = DataFrame::new_infer_height(cols).unwrap();
    let file = std::fs::File::create(path).unwrap();
    ParquetWriter::new(file).finish(&mut df).unwrap();
}

#[test]
fn every_bad_input_is_named_and_harmless() {
    use polars::prelude::Column;
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let fx = fixture();
    let fx = s(&fx);

    // good inputs
    let pairs = write(
        d,
        "pairs.jsonl",
        "{\"prompt\": \"Hi there.\", \"completion\": \"Hello.\"}\n{\"prompt\": \"Bye.\", \"completion\": \"Goodbye.\"}\n",
    );
    let prefs = write(
        d,
        "prefs.jsonl",
        "{\"prompt\": \"Hi.\", \"chosen\": \"Hello there.\", \"rejected\": \"No.\"}\n{\"prompt\": \"Bye.\", \"chosen\": \"Goodbye.\", \"rejected\": \"?\"}\n",
    );
    let prompts = write(
        d,
        "prompts.jsonl",
        "{\"prompt\": \"Hi.\"}\n{\"prompt\": \"Bye.\"}\n",
    );
    let rm = d.join("rm");
    ok(&[
        "reward",
        "--policy",
        fx,
        "--size-ratio",
        "1",
        "--data",
        s(&prefs),
        "--out",
        s(&rm),
        "--steps",
        "1",
        "--batch-size",
        "2",
    ]);
    // outputs that exist before every case
    let out = d.join("existing");
    ok(&[
        "init",
        "--config",
        &format!("{fx}/config.json"),
        "--tokenizer",
        &format!("{fx}/tokenizer.json"),
        "--out",
        s(&out),
    ]);
    let out_file = write(d, "existing.jsonl", "{\"keep\": true}\n");
    let before = (snapshot(&out), snapshot(&out_file));
    let (o, of) = (s(&out).to_string(), s(&out_file).to_string());

    // broken inputs
    let malformed = write(
        d,
        "malformed.jsonl",
        "{\"prompt\": \"a\", \"completion\": \"b\"}\n{not json\n",
    );
    let empty = write(d, "empty.jsonl", "");
    let empty_completion = write(
        d,
        "empty_completion.jsonl",
        "{\"prompt\": \"Hi.\", \"completion\": \"\"}\n",
    );
    let typed = write(d, "typed.jsonl", "{\"prompt\": 5, \"completion\": \"x\"}\n");
    let long = write(
        d,
        "long.jsonl",
        &format!(
            "{{\"prompt\": \"{}\", \"completion\": \"x\"}}\n",
            "word ".repeat(400)
        ),
    );
    let long_prompts = write(
        d,
        "long_prompts.jsonl",
        &format!("{{\"prompt\": \"{}\"}}\n", "word ".repeat(400)),
    );
    let no_rejected = write(
        d,
        "no_rejected.jsonl",
        "{\"prompt\": \"Hi.\", \"chosen\": \"Hello.\"}\n",
    );
    let no_completion = write(d, "no_completion.jsonl", "{\"prompt\": \"Hi.\"}\n");
    let bad_topk = write(
        d,
        "bad_topk.jsonl",
        "{\"prompt\": \"Hi.\", \"completion\": \"Hello.\", \"teacher_topk_ids\": [[1, 2]], \"teacher_topk_logprobs\": [[-0.1, -2.0]]}\n",
    );
    let story = write(
        d,
        "story.jsonl",
        "{\"prompt\": \"What is 1 plus 2?\"}\n{\"prompt\": \"Tell me a story.\"}\n",
    );
    let missing_col = d.join("missing_col.parquet");
    parquet(
        &missing_col,
        Column::new("prompt".into(), ["Hi.", "Bye."]),
        None,
    );
    let wrong_type = d.join("wrong_type.parquet");
    parquet(
        &wrong_type,
        Column::new("prompt".into(), [1i64, 2]),
        Some(Column::new("completion".into(), ["a", "b"])),
    );
    let truncated = broken(d, "truncated", |c| {
        let p = c.join("model.safetensors");
        let b = std::fs::read(&p).unwrap();
        std::fs::write(&p, &b[..b.len() / 2]).unwrap();
    });
    let lying = broken(d, "lying", |c| {
        let p = c.join("model.safetensors");
        let mut b = std::fs::read(&p).unwrap();
        let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
        let header = String::from_utf8(b[8..8 + n].to_vec()).unwrap();
        let i = header.find("\"data_offsets\":[").unwrap() + 16;
        let j = i + header[i..].find(']').unwrap();
        let fake = format!("{:width$}", "0,99999999", width = j - i);
        b.splice(8 + i..8 + j, fake.bytes());
        std::fs::write(&p, b).unwrap();
    });
    let nan = broken(d, "nan", |c| {
        rewrite(c, |name, dt, sh, mut b| {
            if name == "model.norm.weight" {
                b[..4].copy_from_slice(&f32::NAN.to_le_bytes());
            }
            Some((dt, sh, b))
        })
    });
    let missing = broken(d, "missing", |c| {
        rewrite(c, |name, dt, sh, b| {
            (name != "model.layers.1.mlp.up_proj.weight").then_some((dt, sh, b))
        })
    });
    let bad_config = broken(d, "bad_config", |c| {
        std::fs::write(c.join("config.json"), "{\"hidden_size\": ").unwrap();
    });
    let no_config = broken(d, "no_config", |c| {
        std::fs::remove_file(c.join("config.json")).unwrap()
    });
    let wider = broken(d, "wider", |_| {});
    ok(&[
        "init",
        "--config",
        s(&{
            let c = d.join("wide.json");
            let mut v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(fixture().join("config.json")).unwrap())
                    .unwrap();
            v["intermediate_size"] = 96.into();
            std::fs::write(&c, v.to_string()).unwrap();
            c
        }),
        "--tokenizer",
        &format!("{fx}/tokenizer.json"),
        "--out",
        s(&wider),
        "--overwrite",
    ]);
    let big_vocab = broken(d, "big_vocab", |c| {
        let corpus = c.join("corpus.txt");
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
            s(&c.join("tokenizer.json")),
            "--overwrite",
        ]);
    });
    let renamed = broken(d, "renamed", |c| {
        edit_config(c, "num_hidden_layers", 2.into())
    });

    let (pairs, prefs, prompts, rm) = (s(&pairs), s(&prefs), s(&prompts), s(&rm));
    let sft = |data: &Path| -> Vec<String> {
        [
            "sft",
            "--model",
            fx,
            "--data",
            s(data),
            "--out",
            &o,
            "--overwrite",
            "--steps",
            "2",
        ]
        .map(String::from)
        .to_vec()
    };
    let sft_model = |model: &Path| -> Vec<String> {
        [
            "sft",
            "--model",
            s(model),
            "--data",
            pairs,
            "--out",
            &o,
            "--overwrite",
            "--steps",
            "2",
        ]
        .map(String::from)
        .to_vec()
    };
    let v = |a: &[&str]| a.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let cases: Vec<(&str, Vec<String>, Vec<String>)> = vec![
        (
            "malformed JSONL line",
            sft(&malformed),
            v(&["malformed.jsonl:2"]),
        ),
        ("empty file", sft(&empty), v(&["empty.jsonl", "no rows"])),
        (
            "empty completion",
            sft(&empty_completion),
            v(&["empty_completion.jsonl:1", "completion"]),
        ),
        (
            "wrong-typed JSONL field",
            sft(&typed),
            v(&["typed.jsonl:1", "prompt", "string"]),
        ),
        (
            "Parquet with a missing column",
            sft(&missing_col),
            v(&["missing_col.parquet", "row 1", "completion"]),
        ),
        (
            "Parquet with a wrong-typed column",
            sft(&wrong_type),
            v(&["wrong_type.parquet", "row 1", "prompt"]),
        ),
        (
            "prompt longer than the context",
            sft(&long),
            v(&["long.jsonl", "row 1", "256"]),
        ),
        (
            "top-k rows not matching the completion",
            {
                let mut a = sft(&bad_topk);
                a.extend(v(&["--kd", "topk"]));
                a
            },
            v(&["bad_topk.jsonl", "row 1", "top-k"]),
        ),
        (
            "tokenizer larger than the model",
            sft_model(&big_vocab),
            v(&["tokenizer.json", "vocab_size"]),
        ),
        (
            "truncated safetensors",
            sft_model(&truncated),
            v(&["truncated/model.safetensors"]),
        ),
        (
            "header lying about sizes",
            sft_model(&lying),
            v(&["lying/model.safetensors"]),
        ),
        (
            "NaN in weights",
            sft_model(&nan),
            v(&["model.norm.weight", "non-finite"]),
        ),
        (
            "config that does not match the weights",
            sft_model(&renamed),
            v(&["renamed", "model.layers.2.input_layernorm.weight"]),
        ),
        (
            "missing tensor",
            sft_model(&missing),
            v(&["model.layers.1.mlp.up_proj.weight"]),
        ),
        (
            "malformed config",
            sft_model(&bad_config),
            v(&["bad_config/config.json"]),
        ),
        (
            "missing config",
            sft_model(&no_config),
            v(&["no_config/config.json", "not found"]),
        ),
        (
            "NaN loss in training",
            v(&[
                "sft",
                "--model",
                fx,
                "--data",
                pairs,
                "--out",
                &o,
                "--overwrite",
                "--steps",
                "3",
                "--lr",
                "1e30",
                "--warmup",
                "0",
            ]),
            v(&["loss is not finite", "step"]),
        ),
        (
            "merging models of different shapes",
            v(&[
                "warp",
                "merge",
                "--init",
                fx,
                "--policies",
                fx,
                s(&wider),
                "--out",
                &o,
                "--overwrite",
            ]),
            v(&["wider", "intermediate_size"]),
        ),
        (
            "EMA of models of different shapes",
            v(&[
                "warp",
                "ema",
                "--anchor",
                fx,
                "--policy",
                s(&wider),
                "--out",
                &o,
                "--overwrite",
            ]),
            v(&["wider", "intermediate_size"]),
        ),
        (
            "η that is not a number",
            v(&[
                "warp",
                "merge",
                "--init",
                fx,
                "--policies",
                fx,
                "--eta",
                "0.3,x",
                "--out",
                &o,
                "--overwrite",
            ]),
            v(&["--eta"]),
        ),
        (
            "unknown CLI value",
            v(&[
                "rlhf",
                "--policy",
                fx,
                "--reward",
                rm,
                "--prompts",
                prompts,
                "--out",
                &o,
                "--overwrite",
                "--anchor",
                "bogus",
            ]),
            v(&["bogus", "--anchor"]),
        ),
        (
            "one sample per prompt",
            v(&[
                "rlhf",
                "--policy",
                fx,
                "--reward",
                rm,
                "--prompts",
                prompts,
                "--out",
                &o,
                "--overwrite",
                "--samples",
                "1",
            ]),
            v(&["--samples must be at least 2"]),
        ),
        (
            "RLHF prompt longer than the context",
            v(&[
                "rlhf",
                "--policy",
                fx,
                "--reward",
                rm,
                "--prompts",
                s(&long_prompts),
                "--out",
                &o,
                "--overwrite",
            ]),
            v(&["long_prompts.jsonl", "row 1", "256"]),
        ),
        (
            "task reward on a non-task prompt",
            v(&[
                "rlhf",
                "--policy",
                fx,
                "--task-reward",
                "--prompts",
                s(&story),
                "--out",
                &o,
                "--overwrite",
            ]),
            v(&["story.jsonl", "row 2"]),
        ),
        (
            "preference row without `rejected`",
            v(&[
                "reward",
                "--policy",
                fx,
                "--data",
                s(&no_rejected),
                "--out",
                &o,
                "--overwrite",
                "--size-ratio",
                "1",
            ]),
            v(&["no_rejected.jsonl:1", "rejected"]),
        ),
        (
            "negative size ratio",
            v(&[
                "reward",
                "--policy",
                fx,
                "--data",
                prefs,
                "--out",
                &o,
                "--overwrite",
                "--size-ratio=-1",
            ]),
            v(&["--size-ratio"]),
        ),
        (
            "preference data for a non-task prompt",
            v(&[
                "data",
                "prefs",
                "--policy",
                fx,
                "--prompts",
                s(&story),
                "--out",
                &of,
                "--overwrite",
            ]),
            v(&["story.jsonl", "prompt 2"]),
        ),
        (
            "rows to score without `completion`",
            v(&[
                "score",
                "--reward",
                rm,
                "--input",
                s(&no_completion),
                "--out",
                &of,
                "--overwrite",
            ]),
            v(&["no_completion.jsonl:1", "completion"]),
        ),
        (
            "eval of a checkpoint that is not there",
            v(&[
                "eval",
                "--checkpoints",
                s(&d.join("nothere")),
                "--prompts",
                prompts,
                "--out",
                &of,
                "--overwrite",
            ]),
            v(&["nothere/config.json"]),
        ),
        (
            "eval with a broken reward model",
            v(&[
                "eval",
                "--checkpoints",
                fx,
                "--prompts",
                prompts,
                "--reward",
                s(&truncated),
                "--out",
                &of,
                "--overwrite",
            ]),
            v(&["truncated/model.safetensors"]),
        ),
        (
            "report over a directory without runs",
            v(&[
                "report",
                s(&d.join("truncated")),
                "--out",
                &o,
                "--overwrite",
            ]),
            v(&["no run found under", "truncated"]),
        ),
        (
            "generate into an existing file",
            v(&[
                "generate",
                "--model",
                fx,
                "--prompts",
                prompts,
                "--out",
                &of,
            ]),
            v(&["existing.jsonl", "already exists"]),
        ),
        (
            "SFT into an existing checkpoint",
            v(&["sft", "--model", fx, "--data", pairs, "--out", &o]),
            v(&["existing", "already exists"]),
        ),
        (
            "unwritable output directory",
            v(&[
                "sft",
                "--model",
                fx,
                "--data",
                pairs,
                "--out",
                "/proc/posttrain/out",
            ]),
            v(&["/proc/posttrain"]),
        ),
    ];
    assert!(cases.len() >= 25, "{} cases", cases.len());
    let mut failures = Vec::new();
    for (name, args, needles) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
        let result = std::panic::catch_unwind(|| fails(&args, &needles));
        match result {
            Err(_) => failures.push(format!("{name}: {args:?}")),
            Ok(_) if (snapshot(&out), snapshot(&out_file)) != before => {
                failures.push(format!("{name}: changed the existing outputs"))
            }
            Ok(_) => {}
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
