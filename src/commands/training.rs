//! What every training command does around its stage, in this order:
//! claim the output ([`Training::begin`], before any work), check the memory
//! estimate ([`Training::check_memory`], before any weight is read), load the
//! model with LoRA when asked ([`Training::lm`]), run the stage's loop with
//! resumable state in `OUT.state` ([`Training::run`]), then write the
//! checkpoint with its provenance and remove the state
//! ([`Training::finish`]). A command supplies its settings, data and stage.

use std::path::{Path, PathBuf};

use anyhow::Result;
use burn::module::Module;
use burn::tensor::Device;
use posttrain_datasets::ChatTokenizer;
use posttrain_model::checkpoint::FrozenDtype;
use posttrain_model::{CheckpointWriter, Gemma2Config, Gemma2ForCausalLM, LoraConfig, Provenance};
use posttrain_train::memory::Plan;
use posttrain_train::{MetricsLog, Resume, Run, Saver, StateDir};
use serde_json::Value;

use crate::backend::Env;
use crate::cli::{CheckpointOut, MemoryArgs, TrainArgs};

/// A run a signal stopped after saving its state: the line to print and the
/// exit code (128 + the signal).
#[derive(Debug)]
pub struct Stopped {
    pub line: String,
    pub code: u8,
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.line)
    }
}

impl std::error::Error for Stopped {}

pub struct Training<'a> {
    pub stage: &'static str,
    pub backend: &'a str,
    pub device: Device,
    pub lora: Option<LoraConfig>,
    pub run: RunArgs<'a>,
    /// The memory estimate's line, printed when the loop starts.
    memory: std::cell::OnceCell<String>,
    writer: CheckpointWriter,
    out: &'a Path,
}

/// The flags of every training command that the skeleton reads.
pub struct RunArgs<'a> {
    pub memory: &'a MemoryArgs,
    pub seed: u64,
    pub resume: bool,
    pub save_state_every: usize,
}

impl<'a> From<&'a TrainArgs> for RunArgs<'a> {
    fn from(a: &'a TrainArgs) -> Self {
        Self {
            memory: &a.memory,
            seed: a.seed,
            resume: a.resume,
            save_state_every: a.save_state_every,
        }
    }
}

impl<'a> Training<'a> {
    /// Claims `output` (an existing one is refused unless `--overwrite`).
    pub fn begin(
        stage: &'static str,
        env: &'a Env,
        output: &'a CheckpointOut,
        run: impl Into<RunArgs<'a>>,
    ) -> Result<Self> {
        let run = run.into();
        let lora = run.memory.lora.config()?;
        Ok(Self {
            stage,
            backend: env.backend(),
            device: env.device()?,
            lora,
            writer: CheckpointWriter::create(&output.out, output.overwrite)?,
            out: &output.out,
            run,
            memory: std::cell::OnceCell::new(),
        })
    }

    /// Refuses a run whose estimate exceeds the available memory (unless
    /// `--force`); the estimate is printed when the loop starts.
    pub fn check_memory(&self, plan: &Plan) -> Result<()> {
        let line = super::check_memory(plan, self.run.memory.force)?;
        self.memory.get_or_init(|| line);
        Ok(())
    }

    /// How the base of the checkpoint at `dir` is held, and its bytes.
    pub fn base(&self, dir: &Path) -> Result<(FrozenDtype, u64)> {
        super::base_dtype(dir, &self.device, self.run.memory)
    }

    /// How a frozen model from `dir` is held and its bytes (none without one).
    pub fn frozen(
        &self,
        dir: Option<&Path>,
        dtype: crate::cli::WeightsDtype,
    ) -> Result<(FrozenDtype, u64)> {
        match dir {
            Some(dir) => super::frozen_bytes(dir, &self.device, dtype),
            None => Ok((FrozenDtype::F32, 0)),
        }
    }

    /// The memory plan of training `config` (the checkpoint `trained`, or new
    /// weights when `None`) on micro-batches of `batch` sequences of at most
    /// `longest` tokens beside frozen models of `frozen` bytes.
    pub fn plan<'c>(
        &'c self,
        config: &'c Gemma2Config,
        (batch, longest): (usize, usize),
        trained: Option<&Path>,
        frozen: (FrozenDtype, u64),
    ) -> Result<Plan<'c>> {
        let base = match trained {
            Some(dir) => self.base(dir)?,
            None => (FrozenDtype::F32, 4 * config.num_params() as u64),
        };
        Ok(Plan {
            config,
            lora: self.lora.as_ref(),
            batch,
            longest,
            base,
            frozen_bytes: frozen.1,
            frozen_dtype: frozen.0,
        })
    }

    /// The causal LM at `dir` to train, with LoRA factors when asked.
    pub fn lm(&self, dir: &Path) -> Result<Gemma2ForCausalLM> {
        let model = super::load_trained_lm(dir, &self.device, self.run.memory)?;
        let lora = self.lora.as_ref();
        Ok(super::with_lora(self.stage, model, lora, self.run.seed))
    }

    /// The output directory while it is written.
    pub fn staging(&self) -> &Path {
        self.writer.path()
    }

    /// Runs `train` on `model` with resumable state; `settings` identify the
    /// run (a resume with other settings is refused).
    pub fn run<M: Module, R, E: Into<anyhow::Error>>(
        &self,
        settings: Value,
        config: &Gemma2Config,
        model: M,
        train: impl FnOnce(
            M,
            &mut MetricsLog,
            Option<&Resume>,
            Option<Saver<M>>,
        ) -> Result<(M, Run<R>), E>,
    ) -> Result<(M, Run<R>, StateDir)> {
        self.run_carrying(settings, config, model, None, |m, log, resume, saver| {
            train(m, log, resume.map(|(r, _)| r), saver).map_err(Into::into)
        })
    }

    /// [`Training::run`] for a stage that writes into its output while it
    /// trains (`carry`, RLHF's snapshots: kept with the state) and reads
    /// modules of its own from the state when it resumes.
    pub fn run_carrying<M: Module, T, R>(
        &self,
        settings: Value,
        config: &Gemma2Config,
        model: M,
        carry: Option<&str>,
        train: impl FnOnce(
            M,
            &mut MetricsLog,
            Option<(&Resume, &StateDir)>,
            Option<Saver<M>>,
        ) -> Result<(T, Run<R>)>,
    ) -> Result<(T, Run<R>, StateDir)> {
        if let Some(memory) = self.memory.get() {
            eprintln!("{}: {memory}", self.stage);
        }
        let metrics = self.writer.path().join("metrics.jsonl");
        let mut state = StateDir::new(self.out, settings, config, &metrics);
        state.carry = carry.map(|dir| self.writer.path().join(dir));
        if self.lora.as_ref().is_some_and(|l| l.dropout > 0.0) {
            state.per_rank = Some("its --lora-dropout masks are drawn per rank");
        }
        let (model, resume, mut log) = state.start(self.stage, self.run.resume, model)?;
        if resume.is_some() {
            state.restore_carried()?;
        }
        let saver = state.saver(self.run.save_state_every);
        let resume = resume.as_ref().map(|r| (r, &state));
        let (out, report) = train(model, &mut log, resume, Some(saver)).map_err(|e| {
            match posttrain_train::stop::stopped() {
                Some((signal, step)) => anyhow::Error::new(Stopped {
                    line: format!(
                        "{}: stopped by {} at step {step}; state saved to {}; rerun with --resume",
                        self.stage,
                        posttrain_train::stop::name(signal),
                        state.path.display()
                    ),
                    code: 128 + signal as u8,
                }),
                None => e,
            }
        })?;
        Ok((out, report, state))
    }

    /// Writes the checkpoint (an adapter on `base` with LoRA) with
    /// `provenance`, the optional parents given, the seed and `report`,
    /// then removes the resumable state.
    #[allow(clippy::too_many_arguments)]
    pub fn finish<M: posttrain_model::lora::Adaptable>(
        self,
        model: &M,
        (config, tokenizer): (&Gemma2Config, &ChatTokenizer),
        provenance: Provenance,
        base: &Path,
        parents: &[Option<&Path>],
        mut report: Value,
        state: StateDir,
    ) -> Result<PathBuf> {
        let provenance = super::lora_provenance::<M>(provenance, self.lora, base)?;
        let seed = Some(self.run.seed);
        if let Some(fields) = report.as_object_mut() {
            // each a kernel set to compile on GPU backends (see --length-multiple)
            let shapes = posttrain_model::distinct_shapes();
            fields.insert("batch_shapes".into(), shapes.into());
        }
        let out = super::finish_checkpoint(
            self.writer,
            model,
            config,
            tokenizer,
            provenance,
            parents,
            seed,
            report,
        )?;
        state.remove()?;
        Ok(out)
    }
}
