//! The bad-input matrix, one test per case: each broken input makes the
//! binary exit non-zero with one `error:` line naming the file, row or
//! tensor, and leaves the outputs that existed before byte for byte as they
//! were (every case that writes is pointed at them with --overwrite).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::checkpoints::{edit_config, rewrite};
use crate::{big_tokenizer, error_line, fixture, ok, s};

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

/// A Parquet file of the given columns, written by arrow-rs directly.
fn parquet(path: &Path, columns: Vec<(&str, arrow_array::ArrayRef)>) {
    let batch = arrow_array::RecordBatch::try_from_iter(columns).unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

/// A test's directory: good inputs, outputs that exist before the case
/// (`existing/`, `existing.jsonl`), and broken inputs made on demand.
struct Bed {
    tmp: tempfile::TempDir,
    fx: String,
    out: String,
    out_file: String,
}

impl Bed {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let fx = s(&fixture()).to_string();
        let out = tmp.path().join("existing");
        ok(&[
            "init",
            "--config",
            &format!("{fx}/config.json"),
            "--tokenizer",
            &format!("{fx}/tokenizer.json"),
            "--out",
            s(&out),
        ]);
        let out_file = tmp.path().join("existing.jsonl");
        std::fs::write(&out_file, "{\"keep\": true}\n").unwrap();
        Self {
            fx,
            out: s(&out).to_string(),
            out_file: s(&out_file).to_string(),
            tmp,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// A file `name` holding `text`.
    fn file(&self, name: &str, text: &str) -> String {
        let p = self.path(name);
        std::fs::write(&p, text).unwrap();
        s(&p).to_string()
    }

    fn pairs(&self) -> String {
        self.file(
            "pairs.jsonl",
            "{\"prompt\": \"Hi there.\", \"completion\": \"Hello.\"}\n{\"prompt\": \"Bye.\", \"completion\": \"Goodbye.\"}\n",
        )
    }

    fn prefs(&self) -> String {
        self.file(
            "prefs.jsonl",
            "{\"prompt\": \"Hi.\", \"chosen\": \"Hello there.\", \"rejected\": \"No.\"}\n{\"prompt\": \"Bye.\", \"chosen\": \"Goodbye.\", \"rejected\": \"?\"}\n",
        )
    }

    fn prompts(&self) -> String {
        self.file(
            "prompts.jsonl",
            "{\"prompt\": \"Hi.\"}\n{\"prompt\": \"Bye.\"}\n",
        )
    }

    fn long_text(&self) -> String {
        "word ".repeat(400)
    }

    fn story(&self) -> String {
        self.file(
            "story.jsonl",
            "{\"prompt\": \"What is 1 plus 2?\"}\n{\"prompt\": \"Tell me a story.\"}\n",
        )
    }

    /// A reward model on the fixture, trained one step.
    fn rm(&self) -> String {
        let rm = self.path("rm");
        ok(&[
            "reward",
            "--policy",
            &self.fx,
            "--size-ratio",
            "1",
            "--data",
            &self.prefs(),
            "--out",
            s(&rm),
            "--steps",
            "1",
            "--batch-size",
            "2",
        ]);
        s(&rm).to_string()
    }

    /// A copy of the fixture checkpoint, broken by `edit`.
    fn broken(&self, name: &str, edit: impl FnOnce(&Path)) -> String {
        let to = self.path(name);
        std::fs::create_dir_all(&to).unwrap();
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            std::fs::copy(fixture().join(f), to.join(f)).unwrap();
        }
        edit(&to);
        s(&to).to_string()
    }

    fn truncated(&self) -> String {
        self.broken("truncated", |c| {
            let p = c.join("model.safetensors");
            let b = std::fs::read(&p).unwrap();
            std::fs::write(&p, &b[..b.len() / 2]).unwrap();
        })
    }

    /// The fixture with a wider MLP.
    fn wider(&self) -> String {
        let config = self.path("wide.json");
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(fixture().join("config.json")).unwrap()).unwrap();
        v["intermediate_size"] = 96.into();
        std::fs::write(&config, v.to_string()).unwrap();
        let wider = self.path("wider");
        ok(&[
            "init",
            "--config",
            s(&config),
            "--tokenizer",
            &format!("{}/tokenizer.json", self.fx),
            "--out",
            s(&wider),
        ]);
        s(&wider).to_string()
    }

    /// `sft` of the fixture on `data` into the existing checkpoint.
    fn sft(&self, data: &str) -> Vec<String> {
        args(&[
            "sft",
            "--model",
            &self.fx,
            "--data",
            data,
            "--out",
            &self.out,
            "--overwrite",
            "--steps",
            "2",
        ])
    }

    /// `sft` of `model` on good pairs into the existing checkpoint.
    fn sft_model(&self, model: &str) -> Vec<String> {
        args(&[
            "sft",
            "--model",
            model,
            "--data",
            &self.pairs(),
            "--out",
            &self.out,
            "--overwrite",
            "--steps",
            "2",
        ])
    }

    /// Runs `args`, expects the error line to hold every needle, and the
    /// existing outputs unchanged.
    fn refuses(&self, args: Vec<String>, needles: &[&str]) {
        let (out, out_file) = (Path::new(&self.out), Path::new(&self.out_file));
        let before = (snapshot(out), snapshot(out_file));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        error_line(&args, needles);
        assert!(
            (snapshot(out), snapshot(out_file)) == before,
            "{args:?} changed the existing outputs"
        );
    }
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|x| x.to_string()).collect()
}

/// One test per case: `name: |bed| command => [needles];`.
macro_rules! bad_inputs {
    ($($name:ident: |$b:ident| $args:expr => [$($needle:expr),* $(,)?];)*) => {$(
        #[test]
        fn $name() {
            let $b = Bed::new();
            let args = $args;
            $b.refuses(args, &[$($needle),*]);
        }
    )*};
}

bad_inputs! {
    malformed_jsonl_line: |b| b.sft(&b.file(
        "malformed.jsonl",
        "{\"prompt\": \"a\", \"completion\": \"b\"}\n{not json\n",
    )) => ["malformed.jsonl:2"];

    empty_file: |b| b.sft(&b.file("empty.jsonl", "")) => ["empty.jsonl", "no rows"];

    empty_completion: |b| b.sft(&b.file(
        "empty_completion.jsonl",
        "{\"prompt\": \"Hi.\", \"completion\": \"\"}\n",
    )) => ["empty_completion.jsonl:1", "completion"];

    wrong_typed_jsonl_field: |b| b.sft(&b.file(
        "typed.jsonl",
        "{\"prompt\": 5, \"completion\": \"x\"}\n",
    )) => ["typed.jsonl:1", "prompt", "string"];

    byte_that_is_not_utf8: |b| {
        let path = b.path("latin1.jsonl");
        std::fs::write(&path, b"{\"prompt\": \"caf\xE9\", \"completion\": \"x\"}\n").unwrap();
        b.sft(s(&path))
    } => ["latin1.jsonl:1", "not valid UTF-8"];

    parquet_with_a_missing_column: |b| {
        use arrow_array::StringArray;
        let path = b.path("missing_col.parquet");
        parquet(&path, vec![("prompt", Arc::new(StringArray::from(vec!["Hi.", "Bye."])) as _)]);
        b.sft(s(&path))
    } => ["missing_col.parquet", "row 1", "completion"];

    parquet_with_a_wrong_typed_column: |b| {
        use arrow_array::{Int64Array, StringArray};
        let path = b.path("wrong_type.parquet");
        parquet(
            &path,
            vec![
                ("prompt", Arc::new(Int64Array::from(vec![1, 2])) as _),
                ("completion", Arc::new(StringArray::from(vec!["a", "b"])) as _),
            ],
        );
        b.sft(s(&path))
    } => ["wrong_type.parquet", "row 1", "prompt"];

    prompt_longer_than_the_context: |b| b.sft(&b.file(
        "long.jsonl",
        &format!("{{\"prompt\": \"{}\", \"completion\": \"x\"}}\n", b.long_text()),
    )) => ["long.jsonl", "row 1", "256"];

    top_k_rows_not_matching_the_completion: |b| {
        let mut a = b.sft(&b.file(
            "bad_topk.jsonl",
            "{\"prompt\": \"Hi.\", \"completion\": \"Hello.\", \"teacher_topk_ids\": [[1, 2]], \"teacher_topk_logprobs\": [[-0.1, -2.0]]}\n",
        ));
        a.extend(args(&["--kd", "topk"]));
        a
    } => ["bad_topk.jsonl", "row 1", "top-k"];

    tokenizer_larger_than_the_model: |b| b.sft_model(&b.broken("big_vocab", big_tokenizer))
        => ["big_vocab/tokenizer.json", "vocab_size"];

    reward_model_tokenizer_larger_than_the_model: |b| {
        let rm = b.rm();
        big_tokenizer(Path::new(&rm));
        args(&[
            "score", "--reward", &rm, "--input", &b.pairs(), "--out", &b.out_file, "--overwrite",
        ])
    } => ["rm/tokenizer.json", "vocab_size"];

    truncated_safetensors: |b| b.sft_model(&b.truncated()) => ["truncated/model.safetensors"];

    header_lying_about_sizes: |b| b.sft_model(&b.broken("lying", |c| {
        let p = c.join("model.safetensors");
        let mut bytes = std::fs::read(&p).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
        let i = header.find("\"data_offsets\":[").unwrap() + 16;
        let j = i + header[i..].find(']').unwrap();
        let fake = format!("{:width$}", "0,99999999", width = j - i);
        bytes.splice(8 + i..8 + j, fake.bytes());
        std::fs::write(&p, bytes).unwrap();
    })) => ["lying/model.safetensors"];

    nan_in_weights: |b| b.sft_model(&b.broken("nan", |c| {
        rewrite(c, |name, dt, sh, mut bytes| {
            if name == "model.norm.weight" {
                bytes[..4].copy_from_slice(&f32::NAN.to_le_bytes());
            }
            Some((dt, sh, bytes))
        })
    })) => ["model.norm.weight", "non-finite"];

    config_that_does_not_match_the_weights: |b| b.sft_model(&b.broken("renamed", |c| {
        edit_config(c, "num_hidden_layers", 2.into())
    })) => ["renamed", "model.layers.2.input_layernorm.weight"];

    missing_tensor: |b| b.sft_model(&b.broken("missing", |c| {
        rewrite(c, |name, dt, sh, bytes| {
            (name != "model.layers.1.mlp.up_proj.weight").then_some((dt, sh, bytes))
        })
    })) => ["model.layers.1.mlp.up_proj.weight"];

    a_run_that_will_not_fit_in_memory: |b| b.sft_model(&b.broken("huge", |c| {
        edit_config(c, "hidden_size", 65536.into());
        edit_config(c, "intermediate_size", 262144.into())
    })) => ["needs about", "GB are available", "--lora-rank", "--force"];

    malformed_config: |b| b.sft_model(&b.broken("bad_config", |c| {
        std::fs::write(c.join("config.json"), "{\"hidden_size\": ").unwrap();
    })) => ["bad_config/config.json"];

    missing_config: |b| b.sft_model(&b.broken("no_config", |c| {
        std::fs::remove_file(c.join("config.json")).unwrap()
    })) => ["no_config/config.json", "not found"];

    nan_loss_in_training: |b| args(&[
        "sft", "--model", &b.fx, "--data", &b.pairs(), "--out", &b.out, "--overwrite",
        "--steps", "3", "--lr", "1e30", "--warmup", "0",
    ]) => ["loss is not finite", "step"];

    merging_models_of_different_shapes: |b| args(&[
        "warp", "merge", "--init", &b.fx, "--policies", &b.fx, &b.wider(),
        "--out", &b.out, "--overwrite",
    ]) => ["wider", "intermediate_size"];

    ema_of_models_of_different_shapes: |b| args(&[
        "warp", "ema", "--anchor", &b.fx, "--policy", &b.wider(), "--out", &b.out, "--overwrite",
    ]) => ["wider", "intermediate_size"];

    averaging_one_model: |b| args(&[
        "warp", "average", "--models", &b.fx, "--out", &b.out, "--overwrite",
    ]) => ["--models", "at least two models"];

    averaging_models_of_different_shapes: |b| args(&[
        "warp", "average", "--models", &b.fx, &b.wider(), "--out", &b.out, "--overwrite",
    ]) => ["wider", "intermediate_size"];

    averaging_with_negative_weights: |b| args(&[
        "warp", "average", "--models", &b.fx, &b.fx, "--weights", "1,-1",
        "--out", &b.out, "--overwrite",
    ]) => ["--weights", "non-negative"];

    eta_that_is_not_a_number: |b| args(&[
        "warp", "merge", "--init", &b.fx, "--policies", &b.fx, "--eta", "0.3,x",
        "--out", &b.out, "--overwrite",
    ]) => ["--eta"];

    eta_that_would_extrapolate: |b| args(&[
        "warp", "merge", "--init", &b.fx, "--policies", &b.fx, "--eta", "0.3,1.5",
        "--out", &b.out, "--overwrite",
    ]) => ["--eta 1.5", "[0, 1]", "--allow-extrapolation"];

    unknown_cli_value: |b| args(&[
        "rlhf", "--policy", &b.fx, "--task-reward", "--prompts", &b.prompts(),
        "--out", &b.out, "--overwrite", "--anchor", "bogus",
    ]) => ["bogus", "--anchor"];

    unknown_advantage: |b| args(&[
        "rlhf", "--policy", &b.fx, "--task-reward", "--prompts", &b.prompts(),
        "--out", &b.out, "--overwrite", "--advantage", "ppo",
    ]) => ["ppo", "--advantage"];

    one_sample_per_prompt: |b| args(&[
        "rlhf", "--policy", &b.fx, "--reward", &b.rm(), "--prompts", &b.prompts(),
        "--out", &b.out, "--overwrite", "--samples", "1",
    ]) => ["--samples must be at least 2"];

    rlhf_prompt_longer_than_the_context: |b| args(&[
        "rlhf", "--policy", &b.fx, "--reward", &b.rm(),
        "--prompts", &b.file("long_prompts.jsonl", &format!("{{\"prompt\": \"{}\"}}\n", b.long_text())),
        "--out", &b.out, "--overwrite",
    ]) => ["long_prompts.jsonl", "row 1", "256"];

    task_reward_on_a_non_task_prompt: |b| args(&[
        "rlhf", "--policy", &b.fx, "--task-reward", "--prompts", &b.story(),
        "--out", &b.out, "--overwrite",
    ]) => ["story.jsonl", "row 2"];

    preference_row_without_rejected: |b| args(&[
        "reward", "--policy", &b.fx,
        "--data", &b.file("no_rejected.jsonl", "{\"prompt\": \"Hi.\", \"chosen\": \"Hello.\"}\n"),
        "--out", &b.out, "--overwrite", "--size-ratio", "1",
    ]) => ["no_rejected.jsonl:1", "rejected"];

    preferences_whose_chosen_equals_rejected: |b| args(&[
        "reward", "--policy", &b.fx,
        "--data", &b.file("ties.jsonl", "{\"prompt\": \"Hi.\", \"chosen\": \"Hello.\", \"rejected\": \"Hello.\"}\n"),
        "--out", &b.out, "--overwrite", "--size-ratio", "1",
    ]) => ["ties.jsonl", "`chosen` equals its `rejected`"];

    dpo_row_without_rejected: |b| args(&[
        "dpo", "--policy", &b.fx,
        "--data", &b.file("no_rejected.jsonl", "{\"prompt\": \"Hi.\", \"chosen\": \"Hello.\"}\n"),
        "--out", &b.out, "--overwrite",
    ]) => ["no_rejected.jsonl:1", "rejected"];

    dpo_with_beta_zero: |b| args(&[
        "dpo", "--policy", &b.fx, "--data", &b.prefs(), "--out", &b.out, "--overwrite",
        "--beta", "0",
    ]) => ["--beta must be positive"];

    negative_size_ratio: |b| args(&[
        "reward", "--policy", &b.fx, "--data", &b.prefs(), "--out", &b.out, "--overwrite",
        "--size-ratio=-1",
    ]) => ["--size-ratio"];

    preference_data_for_a_non_task_prompt: |b| args(&[
        "data", "prefs", "--policy", &b.fx, "--prompts", &b.story(), "--out", &b.out_file,
        "--overwrite",
    ]) => ["story.jsonl", "prompt 2"];

    rows_to_score_without_completion: |b| args(&[
        "score", "--reward", &b.rm(),
        "--input", &b.file("no_completion.jsonl", "{\"prompt\": \"Hi.\"}\n"),
        "--out", &b.out_file, "--overwrite",
    ]) => ["no_completion.jsonl:1", "completion"];

    eval_of_a_checkpoint_that_is_not_there: |b| args(&[
        "eval", "--checkpoints", s(&b.path("nothere")), "--prompts", &b.prompts(),
        "--out", &b.out_file, "--overwrite",
    ]) => ["nothere/config.json"];

    eval_with_a_broken_reward_model: |b| args(&[
        "eval", "--checkpoints", &b.fx, "--prompts", &b.prompts(), "--reward", &b.truncated(),
        "--out", &b.out_file, "--overwrite",
    ]) => ["truncated/model.safetensors"];

    report_over_a_directory_without_runs: |b| args(&[
        "report", &b.truncated(), "--out", &b.out, "--overwrite",
    ]) => ["no run found under", "truncated"];

    generate_into_an_existing_file: |b| args(&[
        "generate", "--model", &b.fx, "--prompts", &b.prompts(), "--out", &b.out_file,
    ]) => ["existing.jsonl", "already exists"];

    sft_into_an_existing_checkpoint: |b| args(&[
        "sft", "--model", &b.fx, "--data", &b.pairs(), "--out", &b.out,
    ]) => ["existing", "already exists"];

    unwritable_output_directory: |b| args(&[
        "sft", "--model", &b.fx, "--data", &b.pairs(), "--out", "/proc/posttrain/out",
    ]) => ["/proc/posttrain"];
}
