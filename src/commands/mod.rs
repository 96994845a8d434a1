use std::path::Path;

use posttrain_model::checkpoint::FrozenDtype;

pub mod bench;
pub mod convert;
pub mod data;
pub mod dpo;
pub mod eval;
pub mod generate;
pub mod init;
pub mod inspect;
pub mod logits;
pub mod orpo;
pub mod pretrain;
pub mod report;
pub mod reward;
pub mod rlhf;
pub mod sample;
pub mod sft;
pub mod tokenizer;
pub mod training;
pub mod warp;

/// The embedded task's ground-truth scorer, as the stages take scorers.
pub fn task_scorer(prompt: &str, answer: &str) -> Option<(f64, bool)> {
    posttrain_datasets::task::score(prompt, answer).map(|s| (s.score, s.correct))
}

/// Checks, before any work, that an output will not silently replace a
/// file, and claims it (a signal before it is written names it).
pub fn refuse_existing(out: Option<&std::path::Path>, overwrite: bool) -> anyhow::Result<()> {
    match out {
        Some(path) => {
            posttrain_files::refuse_existing(path, overwrite)?;
            posttrain_files::staging::claim(path);
            Ok(())
        }
        None => Ok(()),
    }
}

/// Checks, before any work, an output table: not silently replacing a file,
/// and a name whose extension says JSONL or Parquet.
pub fn check_table_output(out: Option<&std::path::Path>, overwrite: bool) -> anyhow::Result<()> {
    refuse_existing(out, overwrite)?;
    if let Some(path) = out {
        posttrain_datasets::records::Format::of(path)?;
    }
    Ok(())
}

/// A causal LM checkpoint with its tokenizer, checked to fit together.
pub struct ChatModel {
    pub config: posttrain_model::Gemma2Config,
    pub model: posttrain_model::Gemma2ForCausalLM,
    pub tokenizer: posttrain_datasets::ChatTokenizer,
    /// How the matrices are held.
    pub held: FrozenDtype,
}

impl crate::cli::WeightsDtype {
    /// How a frozen model from `dir` is held on `device` (`auto`: bf16 for
    /// a 16-bit checkpoint on the CPU, else f32); refused in one line where
    /// the backend cannot hold it.
    pub fn resolve(self, dir: &Path, device: &burn::tensor::Device) -> anyhow::Result<FrozenDtype> {
        use crate::cli::WeightsDtype;
        use posttrain_model::quant::QuantFormat;
        let dtype = match self {
            WeightsDtype::Auto if posttrain_model::checkpoint::holds_compact(dir, device)? => {
                FrozenDtype::Bf16
            }
            WeightsDtype::Auto | WeightsDtype::F32 => FrozenDtype::F32,
            WeightsDtype::Bf16 => FrozenDtype::Bf16,
            WeightsDtype::Int8 => FrozenDtype::Quantized(QuantFormat::Int8),
            WeightsDtype::Nf4 => FrozenDtype::Quantized(QuantFormat::Nf4),
        };
        posttrain_model::checkpoint::refuse_unsupported(dir, device, dtype)?;
        Ok(dtype)
    }
}

impl ChatModel {
    /// A frozen causal LM with its tokenizer (sampling, teachers,
    /// references, eval), its matrices held as `dtype` says, products in f32.
    pub fn load(
        dir: &std::path::Path,
        device: &burn::tensor::Device,
        dtype: crate::cli::WeightsDtype,
    ) -> anyhow::Result<Self> {
        let (config, tokenizer) = chat_config(dir)?;
        let held = dtype.resolve(dir, device)?;
        let (_, model) = posttrain_model::checkpoint::load_causal_lm_frozen(dir, device, held)?;
        Ok(Self {
            held,
            config,
            model,
            tokenizer,
        })
    }

    pub fn stop_ids(&self) -> Vec<u32> {
        stop_ids(&self.config, &self.tokenizer)
    }
}

/// A checkpoint's config and tokenizer (checked to fit each other), without
/// its weights.
pub fn chat_config(
    dir: &Path,
) -> anyhow::Result<(
    posttrain_model::Gemma2Config,
    posttrain_datasets::ChatTokenizer,
)> {
    let config = posttrain_model::load_config(dir)?;
    let path = dir.join(posttrain_model::checkpoint::TOKENIZER_FILE);
    let tokenizer = posttrain_datasets::ChatTokenizer::from_file(&path)?;
    check_tokenizer_fits(&tokenizer, &path, &config, &dir.join("config.json"))?;
    Ok((config, tokenizer))
}

/// The run's memory estimate as a line to print once the stage starts;
/// refuses the run when it exceeds the available memory (unless `force`),
/// before any weights load.
pub fn check_memory(plan: &posttrain_train::memory::Plan, force: bool) -> anyhow::Result<String> {
    use posttrain_train::memory;
    let available = memory::available();
    let footprint = memory::check(plan, available, force).map_err(anyhow::Error::msg)?;
    Ok(format!(
        "memory estimate {}{}",
        footprint.describe(),
        available.map_or(String::new(), |a| format!(
            ", {:.1} GB available",
            a as f64 / 1e9
        ))
    ))
}

/// Bytes a model from `dir` occupies held as `dtype`.
pub fn held_bytes(dir: &Path, dtype: FrozenDtype) -> anyhow::Result<u64> {
    let config = posttrain_model::load_config(dir)?;
    let other = if posttrain_model::checkpoint::stores_16_bit(dir)? {
        2
    } else {
        4
    };
    Ok(dtype.model_bytes(&config, other))
}

/// How a frozen model from `dir` is held and its bytes (as
/// [`ChatModel::load`] and [`load_reward`] hold it).
pub fn frozen_bytes(
    dir: &Path,
    device: &burn::tensor::Device,
    dtype: crate::cli::WeightsDtype,
) -> anyhow::Result<(FrozenDtype, u64)> {
    let held = dtype.resolve(dir, device)?;
    Ok((held, held_bytes(dir, held)?))
}

/// How the trained model from `dir` holds its matrices on `device`, and
/// their bytes: f32 unless a LoRA run holds its frozen base otherwise.
pub fn base_dtype(
    dir: &Path,
    device: &burn::tensor::Device,
    memory: &crate::cli::MemoryArgs,
) -> anyhow::Result<(FrozenDtype, u64)> {
    let held = match memory.lora.lora_rank {
        Some(_) => memory.base_dtype.resolve(dir, device)?,
        None => FrozenDtype::F32,
    };
    Ok((held, held_bytes(dir, held)?))
}

/// The causal LM a stage trains, on `train` (the autodiff form of
/// `device`), its base held as [`base_dtype`] says.
pub fn load_trained_lm(
    dir: &Path,
    device: &burn::tensor::Device,
    memory: &crate::cli::MemoryArgs,
) -> anyhow::Result<posttrain_model::Gemma2ForCausalLM> {
    let train = &train_device(device, memory.checkpoint_activations);
    let (held, _) = base_dtype(dir, device, memory)?;
    Ok(posttrain_model::checkpoint::load_causal_lm_frozen(dir, train, held)?.1)
}

/// The device a training stage trains on: `device` with autodiff, and with
/// Burn's gradient checkpointing when `checkpoint_activations`.
pub fn train_device(
    device: &burn::tensor::Device,
    checkpoint_activations: bool,
) -> burn::tensor::Device {
    let device = device.clone().autodiff();
    if checkpoint_activations {
        device.gradient_checkpointing()
    } else {
        device
    }
}

/// What the loop of `pretrain` and `sft` returns.
type LmRun = Result<
    (
        posttrain_model::Gemma2ForCausalLM,
        posttrain_train::Run<posttrain_sft::SftReport>,
    ),
    posttrain_sft::SftError,
>;

/// The loop of `pretrain` and `sft` on `data`, as [`training::Training::run`]
/// takes it.
pub fn lm_loop<'a>(
    stage: &'a str,
    teacher: Option<&'a posttrain_model::Gemma2ForCausalLM>,
    data: &'a TrainData,
    vocab: &'a posttrain_train::Vocab<'a>,
    cfg: &'a posttrain_sft::SftConfig,
) -> impl FnOnce(
    posttrain_model::Gemma2ForCausalLM,
    &mut posttrain_train::MetricsLog,
    Option<&posttrain_train::Resume>,
    Option<posttrain_train::Saver<posttrain_model::Gemma2ForCausalLM>>,
) -> LmRun
+ 'a {
    move |model, log, resume, saver| {
        let (train, eval) = (&data.train, &data.eval);
        posttrain_sft::train_lm(
            stage, model, teacher, train, eval, vocab, cfg, log, resume, saver,
        )
    }
}

/// The tokenizer side of a run on `config`.
pub fn vocab<'a>(
    config: &posttrain_model::Gemma2Config,
    tokenizer: &'a posttrain_datasets::ChatTokenizer,
) -> posttrain_train::Vocab<'a> {
    posttrain_train::Vocab {
        tokenizer,
        stop_ids: stop_ids(config, tokenizer),
        max_len: config.max_position_embeddings,
    }
}

/// Generation stops at the config's EOS ids, `<eos>` and `<end_of_turn>`.
pub fn stop_ids(
    config: &posttrain_model::Gemma2Config,
    tokenizer: &posttrain_datasets::ChatTokenizer,
) -> Vec<u32> {
    let mut stop = config.eos_ids();
    stop.extend([tokenizer.eos, tokenizer.end_of_turn]);
    stop
}

/// A teacher checkpoint, checked to share the student's vocabulary.
pub fn load_teacher(
    dir: &Path,
    student: &posttrain_model::Gemma2Config,
    tokenizer: &posttrain_datasets::ChatTokenizer,
    device: &burn::tensor::Device,
    dtype: crate::cli::WeightsDtype,
) -> anyhow::Result<posttrain_model::Gemma2ForCausalLM> {
    let teacher = ChatModel::load(dir, device, dtype)?;
    if teacher.config.vocab_size != student.vocab_size
        || teacher.tokenizer.vocab_size() != tokenizer.vocab_size()
    {
        anyhow::bail!(
            "{}: teacher vocabulary ({} ids, tokenizer {}) differs from the student's ({} ids, tokenizer {})",
            dir.display(),
            teacher.config.vocab_size,
            teacher.tokenizer.vocab_size(),
            student.vocab_size,
            tokenizer.vocab_size()
        );
    }
    Ok(teacher.model)
}

/// Training rows and the eval set, tokenized.
pub struct TrainData {
    pub train: Vec<posttrain_datasets::Example>,
    pub eval: posttrain_sft::EvalSet,
}

impl TrainData {
    /// The longest training row, in tokens.
    pub fn longest(&self) -> usize {
        self.train.iter().map(|e| e.ids.len()).max().unwrap_or(0)
    }

    pub fn load(
        tokenizer: &posttrain_datasets::ChatTokenizer,
        train: &Path,
        eval: Option<&Path>,
        max_len: usize,
        truncate: bool,
        loss_on: posttrain_datasets::LossOn,
        pairs_only: bool,
    ) -> anyhow::Result<Self> {
        use posttrain_datasets::{Overflow, TrainRecord, encode_records, read_records};
        let overflow = if truncate {
            Overflow::Truncate
        } else {
            Overflow::Error
        };
        let load = |path: &Path| -> anyhow::Result<_> {
            let records: Vec<TrainRecord> = read_records(path)?;
            if pairs_only
                && let Some(row) = records
                    .iter()
                    .position(|r| matches!(r, TrainRecord::Text(_)))
            {
                anyhow::bail!(
                    "{}: row {}: a `text` row; this stage trains on prompt/completion pairs",
                    path.display(),
                    row + 1
                );
            }
            let examples = encode_records(tokenizer, &records, max_len, overflow, loss_on, path)?;
            let prompts = records
                .iter()
                .map(|r| match r {
                    TrainRecord::Pair(p) => Some(p.prompt.display().to_string()),
                    TrainRecord::Text(_) => None,
                })
                .collect();
            Ok((examples, prompts))
        };
        let (train, _) = load(train)?;
        let eval = match eval {
            Some(path) => {
                let (examples, prompts) = load(path)?;
                posttrain_sft::EvalSet {
                    examples,
                    prompts,
                    scorer: Some(task_scorer),
                }
            }
            None => posttrain_sft::EvalSet::default(),
        };
        Ok(Self { train, eval })
    }
}

/// The last line of a training stage.
pub fn print_report(
    stage: &str,
    report: &posttrain_train::Run<posttrain_sft::SftReport>,
    out: &Path,
) {
    let score = report.eval_score.map_or(String::new(), |s| {
        format!(", eval score {:.3} (accuracy {:.3})", s.score, s.accuracy)
    });
    eprintln!(
        "{stage}: loss {:.4} -> {:.4}, eval loss {}{score}, {:.0} tokens/s -> {}",
        report.loss.first_loss,
        report.loss.last_loss,
        report.eval_loss.map_or("-".into(), |e| format!("{e:.4}")),
        report.tokens as f64 / report.seconds,
        out.display()
    );
}

/// Refuses a tokenizer with more ids than the model's vocabulary.
pub fn check_tokenizer_fits(
    tokenizer: &posttrain_datasets::ChatTokenizer,
    tokenizer_path: &Path,
    config: &posttrain_model::Gemma2Config,
    config_path: &Path,
) -> anyhow::Result<()> {
    if tokenizer.vocab_size() > config.vocab_size {
        anyhow::bail!(
            "{}: tokenizer has {} tokens but {} sets vocab_size {}",
            tokenizer_path.display(),
            tokenizer.vocab_size(),
            config_path.display(),
            config.vocab_size
        );
    }
    Ok(())
}

/// Writes weights, tokenizer and provenance (with the optional parents that
/// were given, the seed and final metrics) and moves the directory in place.
#[allow(clippy::too_many_arguments)]
pub fn finish_checkpoint<M: burn::module::Module>(
    writer: posttrain_model::CheckpointWriter,
    model: &M,
    config: &posttrain_model::Gemma2Config,
    tokenizer: &posttrain_datasets::ChatTokenizer,
    mut provenance: posttrain_model::Provenance,
    optional_parents: &[Option<&Path>],
    seed: Option<u64>,
    metrics: serde_json::Value,
) -> anyhow::Result<std::path::PathBuf> {
    match provenance.lora.as_ref() {
        Some(origin) => {
            writer.write_adapter(&posttrain_model::lora::adapter_tensors(model), origin)?
        }
        None => writer.write_model(model, config, posttrain_model::SaveDtype::F32)?,
    }
    tokenizer.save_with_configs(writer.path())?;
    for parent in optional_parents.iter().flatten() {
        provenance = provenance.with_parent(parent)?;
    }
    provenance.seed = seed;
    provenance.metrics = metrics;
    writer.write(
        posttrain_model::provenance::PROVENANCE_FILE,
        provenance.to_json().as_bytes(),
    )?;
    Ok(writer.commit()?)
}

/// A row as it is (JSONL or Parquet), whatever its columns.
pub struct JsonRow(pub serde_json::Map<String, serde_json::Value>);

impl posttrain_datasets::Record for JsonRow {
    fn from_row(row: &serde_json::Map<String, serde_json::Value>) -> Result<Self, String> {
        Ok(Self(row.clone()))
    }

    fn to_row(&self) -> serde_json::Value {
        serde_json::Value::Object(self.0.clone())
    }
}

/// The model to train: `model` itself, or with LoRA factors on its frozen
/// weights when `--lora-rank` asks for them (said on stderr), and the
/// provenance that marks the output as an adapter on `base`.
pub fn with_lora<M: posttrain_model::lora::Adaptable>(
    stage: &str,
    model: M,
    lora: Option<&posttrain_model::LoraConfig>,
    seed: u64,
) -> M {
    let Some(cfg) = lora else { return model };
    let total = model.num_params() + model.quantized_params();
    let model = model.attach_lora(cfg, seed);
    let trainable: usize = posttrain_model::params::trainable_param_map(&model)
        .values()
        .map(|t| t.shape.iter().product::<usize>())
        .sum();
    eprintln!(
        "{stage}: LoRA r={} α={} on {}: {trainable} trainable parameters ({:.2}% of {total})",
        cfg.rank,
        cfg.alpha,
        cfg.targets.join(","),
        100.0 * trainable as f64 / total as f64,
    );
    model
}

/// `provenance`, marked as a LoRA adapter on `base` when `lora` is set.
pub fn lora_provenance<M: posttrain_model::lora::Adaptable>(
    provenance: posttrain_model::Provenance,
    lora: Option<posttrain_model::LoraConfig>,
    base: &Path,
) -> anyhow::Result<posttrain_model::Provenance> {
    Ok(match lora {
        Some(cfg) => provenance.with_lora(cfg, base, M::TASK)?,
        None => provenance,
    })
}

/// A reward model checkpoint with its tokenizer.
pub fn load_reward(
    dir: &Path,
    device: &burn::tensor::Device,
    dtype: crate::cli::WeightsDtype,
) -> anyhow::Result<(
    posttrain_model::Gemma2Config,
    posttrain_model::Gemma2ForSequenceClassification,
    posttrain_datasets::ChatTokenizer,
)> {
    // a missing config.json is named before missing weights
    posttrain_model::load_config(dir)?;
    let held = dtype.resolve(dir, device)?;
    let (config, model) = posttrain_model::checkpoint::load_reward_model_frozen(dir, device, held)?;
    let path = dir.join(posttrain_model::checkpoint::TOKENIZER_FILE);
    let tokenizer = posttrain_datasets::ChatTokenizer::from_file(&path)?;
    check_tokenizer_fits(&tokenizer, &path, &config, &dir.join("config.json"))?;
    Ok((config, model, tokenizer))
}
