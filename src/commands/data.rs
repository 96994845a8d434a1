use anyhow::{Result, bail};
use posttrain_datasets::task::{Score, score, synth};
use posttrain_datasets::{ChatTokenizer, Prompt, Record, SftPair, read_records, write_records};
use posttrain_model::checkpoint::TOKENIZER_FILE;
use posttrain_model::{CheckpointWriter, Gemma2Config};
use serde_json::{Value, json};

use crate::backend::Env;
use crate::cli::{DataCommand, PrefsArgs, ScoreArgs, SynthArgs};

pub fn run(command: DataCommand, env: &Env) -> Result<()> {
    match command {
        DataCommand::Synth(args) => synth_task(args),
        DataCommand::Score(args) => score_file(args),
        DataCommand::Prefs(args) => prefs(args, env.device()?, env.backend()),
    }
}

fn prefs(args: PrefsArgs, device: burn::tensor::Device, backend: &str) -> Result<()> {
    use posttrain_generate::{Policy, PrefsConfig, make_preferences};
    super::check_table_output(Some(&args.out), args.overwrite)?;
    if !(0.0..=1.0).contains(&args.label_noise) {
        bail!("--label-noise must be in [0, 1], got {}", args.label_noise);
    }
    let prompts = posttrain_datasets::read_prompts(&args.prompts)?;
    let models = args
        .policy
        .iter()
        .map(|dir| super::ChatModel::load(dir, &device, args.frozen.weights_dtype))
        .collect::<Result<Vec<_>>>()?;
    let first = &models[0];
    for (m, dir) in models.iter().zip(&args.policy).skip(1) {
        if m.tokenizer.vocab_size() != first.tokenizer.vocab_size() {
            bail!(
                "{}: tokenizer of {} tokens, but {} has {}",
                dir.display(),
                m.tokenizer.vocab_size(),
                args.policy[0].display(),
                first.tokenizer.vocab_size()
            );
        }
    }
    let policies: Vec<Policy> = models
        .iter()
        .map(|m| Policy {
            model: &m.model,
            tokenizer: &m.tokenizer,
            stop_ids: m.stop_ids(),
        })
        .collect();
    let cfg = PrefsConfig {
        samples: args.samples,
        temperature: args.temperature,
        max_new_tokens: args.max_new_tokens,
        seed: args.seed,
        label_noise: args.label_noise,
        batch_size: args.batch_size,
        pairs_per_prompt: args.pairs_per_prompt,
    };
    let report = make_preferences(&policies, &prompts, super::task_scorer, &cfg)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.prompts.display()))?;
    write_records(&args.out, &report.pairs, args.overwrite)?;
    let mut provenance = posttrain_model::Provenance::new(
        "data-prefs",
        backend,
        serde_json::json!({ "prefs": cfg }),
    );
    for dir in &args.policy {
        provenance = provenance.with_parent(dir)?;
    }
    provenance
        .with_parent(&args.prompts)?
        .write_beside(&args.out)?;
    eprintln!(
        "data prefs: {} pairs from {} prompts ({} with equal scores skipped, {} flipped), chosen score {:.3} vs rejected {:.3} -> {}",
        report.pairs.len(),
        report.prompts,
        report.skipped,
        report.flipped,
        report.mean_chosen_score,
        report.mean_rejected_score,
        args.out.display()
    );
    Ok(())
}

/// The two model sizes of the embedded recipe: a teacher that learns the
/// task well and a student about ten times smaller.
pub fn task_configs(vocab: usize) -> (Gemma2Config, Gemma2Config) {
    let mut teacher = Gemma2Config::new(vocab, 128, 512, 4, 4, 2, 32, 32);
    let mut student = Gemma2Config::new(vocab, 64, 128, 2, 2, 1, 32, 32);
    for c in [&mut teacher, &mut student] {
        c.max_position_embeddings = 128;
    }
    (teacher, student)
}

fn synth_task(args: SynthArgs) -> Result<()> {
    if args.train == 0 || args.eval == 0 {
        bail!("--train and --eval must be positive");
    }
    if args.max_number == 0 {
        bail!("--max-number must be at least 1");
    }
    let (train, eval) = synth(args.seed, args.train, args.eval, args.max_number);
    let writer = CheckpointWriter::create(&args.out, args.overwrite)?;
    let dir = writer.path();
    let pairs = |items: &[posttrain_datasets::task::Item]| {
        items.iter().map(|i| i.pair()).collect::<Vec<_>>()
    };
    let prompts = |items: &[posttrain_datasets::task::Item]| {
        items
            .iter()
            .map(|i| Prompt::Text(i.prompt.clone()))
            .collect::<Vec<_>>()
    };
    write_records(&dir.join("train.jsonl"), &pairs(&train), false)?;
    write_records(&dir.join("eval.jsonl"), &pairs(&eval), false)?;
    write_records(&dir.join("train_prompts.jsonl"), &prompts(&train), false)?;
    write_records(&dir.join("eval_prompts.jsonl"), &prompts(&eval), false)?;

    let mut corpus: Vec<String> = train
        .iter()
        .chain(&eval)
        .flat_map(|i| [i.prompt.clone(), i.completion.clone()])
        .collect();
    corpus.push("user\nmodel\n".into());
    let tokenizer = ChatTokenizer::train(corpus.iter(), args.vocab_size)?;
    tokenizer.save(&dir.join(TOKENIZER_FILE))?;
    let (teacher, student) = task_configs(tokenizer.vocab_size());
    writer.write("teacher.json", teacher.to_json().as_bytes())?;
    writer.write("student.json", student.to_json().as_bytes())?;
    let mut provenance = posttrain_model::Provenance::new(
        "data-synth",
        "none",
        serde_json::json!({
            "seed": args.seed,
            "train": args.train,
            "eval": args.eval,
            "max_number": args.max_number,
            "vocab_size": args.vocab_size,
        }),
    );
    provenance.seed = Some(args.seed);
    writer.write(
        posttrain_model::provenance::PROVENANCE_FILE,
        provenance.to_json().as_bytes(),
    )?;
    let out = writer.commit()?;
    eprintln!(
        "data synth: {} train / {} eval pairs, {}-token tokenizer, teacher {} params, student {} params -> {}",
        train.len(),
        eval.len(),
        tokenizer.vocab_size(),
        teacher.num_params(),
        student.num_params(),
        out.display()
    );
    Ok(())
}

struct Scored {
    prompt: String,
    completion: String,
    score: Score,
}

impl Record for Scored {
    fn from_row(_: &serde_json::Map<String, Value>) -> Result<Self, String> {
        Err("scored rows are written, not read".into())
    }

    fn to_row(&self) -> Value {
        let mut row = serde_json::to_value(self.score).expect("score serialises");
        row["prompt"] = self.prompt.clone().into();
        row["completion"] = self.completion.clone().into();
        row
    }
}

fn score_file(args: ScoreArgs) -> Result<()> {
    super::check_table_output(args.out.as_deref(), args.overwrite)?;
    let pairs: Vec<SftPair> = read_records(&args.input)?;
    let mut rows = Vec::with_capacity(pairs.len());
    for (i, p) in pairs.iter().enumerate() {
        let Some(s) = score(p.prompt.display(), &p.completion) else {
            bail!(
                "{}: row {}: the prompt is not a question of the embedded task",
                args.input.display(),
                i + 1
            );
        };
        rows.push(Scored {
            prompt: p.prompt.display().to_string(),
            completion: p.completion.clone(),
            score: s,
        });
    }
    let n = rows.len() as f64;
    let frac = |f: fn(&Score) -> bool| rows.iter().filter(|r| f(&r.score)).count() as f64 / n;
    let summary = json!({
        "input": args.input,
        "rows": rows.len(),
        "mean_score": rows.iter().map(|r| r.score.score).sum::<f64>() / n,
        "accuracy": frac(|s| s.correct),
        "capitalised": frac(|s| s.capitalised),
        "period": frac(|s| s.period),
        "concise": frac(|s| s.concise),
    });
    if let Some(out) = &args.out {
        write_records(out, &rows, args.overwrite)?;
    }
    crate::print_stdout(&format!("{summary}\n"))
}
