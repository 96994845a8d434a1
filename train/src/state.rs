//! What a training loop needs to continue where it stopped: steps done,
//! data position and its report so far. The command stores it with the
//! weights and the optimizer state every N steps; `--resume` hands it back.

use std::path::{Path, PathBuf};

use burn::module::Module;
use posttrain_model::{
    CheckpointWriter, Gemma2Config, ModelError, SaveDtype, Weights, params, safetensors_io,
};

use crate::{MetricsLog, Optimizer};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("the report")]
    Report(#[from] serde_json::Error),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoopState {
    /// Optimizer steps done.
    pub step: usize,
    pub epoch: u64,
    pub next: usize,
    /// The stage's report up to `step`.
    pub report: serde_json::Value,
}

/// A saved state to continue from; the model given to the loop is the one
/// saved with it (with its parameter ids).
pub struct Resume {
    pub state: LoopState,
    /// What `Optimizer::save_state` wrote.
    pub optimizer: PathBuf,
    /// The number of processes of the run that saved it.
    pub ranks: usize,
}

impl Resume {
    /// Loads the optimizer state into `optim` and returns the report so far.
    pub fn restore<M: Module, R: serde::de::DeserializeOwned>(
        &self,
        optim: &mut Optimizer<M>,
    ) -> Result<R, StateError> {
        optim.load_state(&self.optimizer)?;
        Ok(serde_json::from_value(self.state.report.clone())?)
    }
}

/// Stores the model, optimizer and loop state; `extra` holds other modules
/// the loop keeps (RLHF's anchor).
pub type SaveFn<'a, M> =
    dyn FnMut(&M, &Optimizer<M>, &LoopState, &[(&str, &M)]) -> Result<(), StateError> + 'a;

/// Saves a loop's state every `every` steps (0: never), except after the last.
pub struct Saver<'a, M> {
    pub every: usize,
    pub save: Box<SaveFn<'a, M>>,
}

impl<M: Module> Saver<'_, M> {
    pub fn due(&self, done: usize, total: usize) -> bool {
        self.every > 0 && done.is_multiple_of(self.every) && done < total
    }

    /// Saves when `done` of `total` steps is due, with the data position
    /// `(epoch, next)` and the report so far.
    #[allow(clippy::too_many_arguments)]
    pub fn after_step(
        &mut self,
        done: usize,
        total: usize,
        (epoch, next): (u64, usize),
        report: serde_json::Value,
        model: &M,
        optim: &Optimizer<M>,
        extra: &[(&str, &M)],
    ) -> Result<(), StateError> {
        if !self.due(done, total) {
            return Ok(());
        }
        self.save_now(done, (epoch, next), report, model, optim, extra)
    }

    /// Saves whatever the schedule (a stop on a signal).
    pub fn save_now(
        &mut self,
        done: usize,
        (epoch, next): (u64, usize),
        report: serde_json::Value,
        model: &M,
        optim: &Optimizer<M>,
        extra: &[(&str, &M)],
    ) -> Result<(), StateError> {
        let state = LoopState {
            step: done,
            epoch,
            next,
            report,
        };
        (self.save)(model, optim, &state, extra)
    }
}

/// `OUT.state/`: what a training run needs to continue after a crash —
/// weights (f32, with their parameter ids), optimizer state, data position,
/// the report and metrics so far, and modules the loop keeps besides the
/// model (RLHF's anchor, as `NAME.safetensors`) — replaced atomically every
/// N steps and removed once the output is complete.
pub struct StateDir {
    pub path: std::path::PathBuf,
    fingerprint: serde_json::Value,
    config: Gemma2Config,
    metrics: std::path::PathBuf,
    /// A directory of the output in progress to keep with the state (RLHF's
    /// snapshots), as `carried/`.
    pub carry: Option<std::path::PathBuf>,
    /// Why the run's random draws depend on the ranks, when they do: its
    /// state then resumes only on as many processes as saved it.
    pub per_rank: Option<&'static str>,
}

/// Hard-links (or copies) every file under `from` to the same place under `to`.
fn link_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    fs_err::create_dir_all(to)?;
    for entry in fs_err::read_dir(from)? {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if src.is_dir() {
            link_tree(&src, &dst)?;
        } else if std::fs::hard_link(&src, &dst).is_err() {
            fs_err::copy(&src, &dst)?;
        }
    }
    Ok(())
}

const OPTIMIZER_STATE: &str = "optimizer.bpk";
const LOOP_STATE: &str = "state.json";

impl StateDir {
    /// `fingerprint`: the settings and inputs a resumed run must share.
    pub fn new(
        out: &Path,
        fingerprint: serde_json::Value,
        config: &Gemma2Config,
        metrics: &Path,
    ) -> Self {
        let mut path = out.as_os_str().to_owned();
        path.push(".state");
        Self {
            path: path.into(),
            fingerprint,
            config: config.clone(),
            metrics: metrics.to_path_buf(),
            carry: None,
            per_rank: None,
        }
    }

    /// Puts what was carried back where the run keeps it.
    pub fn restore_carried(&self) -> Result<(), StateError> {
        let (Some(to), from) = (&self.carry, self.path.join("carried")) else {
            return Ok(());
        };
        if from.is_dir() {
            link_tree(&from, to)?;
        }
        Ok(())
    }

    pub fn save<M: burn::module::Module>(
        &self,
        model: &M,
        optim: &Optimizer<M>,
        state: &LoopState,
        extra: &[(&str, &M)],
    ) -> Result<(), StateError> {
        use SaveDtype::F32;
        if !posttrain_dist::world().is_root() {
            return Ok(());
        }
        let w = CheckpointWriter::create(&self.path, true)?;
        // a LoRA run's frozen base is not state: the run reads it again
        let trained = params::trainable_params(model);
        w.write_weights(&self.config, &trained, F32, 1)?;
        for (name, m) in extra {
            // only the trained tensors reach the host (not a LoRA run's base)
            let tensors: std::collections::BTreeMap<_, _> = params::param_map(*m)
                .into_iter()
                .filter(|(n, _)| trained.contains_key(n))
                .map(|(n, p)| (n, p.to_host()))
                .collect();
            let bytes = safetensors_io::to_safetensors_bytes(&tensors, F32);
            w.write(&format!("{name}.safetensors"), &bytes)?;
        }
        optim.save_state(&w.path().join(OPTIMIZER_STATE))?;
        let loop_state = serde_json::json!({
            "loop": state,
            "ids": params::param_ids(model),
            "fingerprint": self.fingerprint,
            "world_size": posttrain_dist::world().size(),
        });
        w.write(LOOP_STATE, loop_state.to_string().as_bytes())?;
        w.write("metrics.jsonl", &fs_err::read(&self.metrics)?)?;
        if let Some(dir) = self.carry.as_ref().filter(|d| d.is_dir()) {
            link_tree(dir, &w.path().join("carried"))?;
        }
        w.commit()?;
        Ok(())
    }

    /// The saved run, when there is one: `fresh` with the saved trainable
    /// parameters and their ids (so the optimizer state applies), where to
    /// continue, and its metrics so far. `fresh` comes back when there is
    /// none.
    #[allow(clippy::type_complexity)]
    pub fn load<M: burn::module::Module>(
        &self,
        fresh: M,
    ) -> Result<Result<(M, Resume, Vec<u8>), M>, StateError> {
        if !self.path.is_dir() {
            return Ok(Err(fresh));
        }
        let file = self.path.join(LOOP_STATE);
        let v: serde_json::Value =
            serde_json::from_slice(&fs_err::read(&file)?).map_err(|e| StateError::File {
                path: file.clone(),
                reason: e.to_string(),
            })?;
        if v["fingerprint"] != self.fingerprint {
            return Err(StateError::File {
                path: self.path.clone(),
                reason:
                    "written by a run with other settings or inputs (delete it to start afresh)"
                        .into(),
            });
        }
        let (ranks, size) = (
            v["world_size"].as_u64().unwrap_or(1) as usize,
            posttrain_dist::world().size(),
        );
        if let Some(why) = self.per_rank.filter(|_| ranks != size) {
            return Err(StateError::File {
                path: self.path.clone(),
                reason: format!(
                    "written by a run of {ranks} process(es), this one has {size}, and {why}: resume with the same `mpirun -np {ranks}` (or delete it to start afresh)"
                ),
            });
        }
        let parse = |key: &str| StateError::File {
            path: file.clone(),
            reason: format!("`{key}` is malformed"),
        };
        let ids: std::collections::BTreeMap<String, u64> =
            serde_json::from_value(v["ids"].clone()).map_err(|_| parse("ids"))?;
        let state: LoopState =
            serde_json::from_value(v["loop"].clone()).map_err(|_| parse("loop"))?;
        let saved = self.tensors(posttrain_model::safetensors_io::SINGLE_FILE, &fresh)?;
        let model = params::with_param_ids(params::with_params(fresh, &saved), &ids);
        let metrics = fs_err::read(self.path.join("metrics.jsonl"))?;
        let resume = Resume {
            state,
            optimizer: self.path.join(OPTIMIZER_STATE),
            ranks,
        };
        Ok(Ok((model, resume, metrics)))
    }

    /// The tensors of `file` in the state directory, each checked to be a
    /// parameter of `like` with its shape.
    fn tensors<M: Module>(&self, file: &str, like: &M) -> Result<params::ParamMap, StateError> {
        let path = self.path.join(file);
        let weights = Weights::open_file(&path)?;
        let shapes = params::param_shapes(like);
        let device = params::device_of(like);
        weights
            .names()
            .map(|n| {
                let t = weights.read(n)?;
                if shapes.get(n) != Some(&t.shape) {
                    return Err(StateError::File {
                        path: path.clone(),
                        reason: format!(
                            "tensor {n} {:?} is not a parameter of this model (written by another run?)",
                            t.shape
                        ),
                    });
                }
                Ok((n.to_string(), params::ParamTensor::from_host(&t, &device)))
            })
            .collect()
    }

    /// With `resume`, the saved run when there is one (see [`StateDir::load`]),
    /// else `fresh`; says which on stderr.
    #[allow(clippy::type_complexity)]
    pub fn resume_or<M: burn::module::Module>(
        &self,
        stage: &str,
        resume: bool,
        fresh: M,
    ) -> Result<(M, Option<Resume>, Option<Vec<u8>>), StateError> {
        let saved = if resume {
            self.load(fresh)?
        } else {
            Err(fresh)
        };
        Ok(match saved {
            Ok((model, r, rows)) => {
                let size = posttrain_dist::world().size();
                let on = match r.ranks == size {
                    true => String::new(),
                    false => format!(" (saved by {} process(es), continued by {size})", r.ranks),
                };
                eprintln!(
                    "{stage}: resuming from {} at step {}{on}",
                    self.path.display(),
                    r.state.step
                );
                (model, Some(r), Some(rows))
            }
            Err(fresh) => {
                if resume {
                    eprintln!(
                        "{stage}: no {} yet: starting at step 0",
                        self.path.display()
                    );
                }
                (fresh, None, None)
            }
        })
    }

    /// [`StateDir::resume_or`], and the metrics log the run continues
    /// (the saved rows, or a new file).
    #[allow(clippy::type_complexity)]
    pub fn start<M: Module>(
        &self,
        stage: &str,
        resume: bool,
        fresh: M,
    ) -> Result<(M, Option<Resume>, MetricsLog), StateError> {
        let (model, resume, rows) = self.resume_or(stage, resume, fresh)?;
        let log = self.metrics_log(rows.as_deref())?;
        Ok((model, resume, log))
    }

    /// Tensors saved beside the model as `NAME.safetensors`.
    pub fn extra(
        &self,
        name: &str,
        device: &burn::tensor::Device,
    ) -> Result<params::ParamMap, StateError> {
        let weights = Weights::open_file(&self.path.join(format!("{name}.safetensors")))?;
        weights
            .names()
            .map(|n| {
                let t = weights.read(n)?;
                Ok((n.to_string(), params::ParamTensor::from_host(&t, device)))
            })
            .collect()
    }

    /// Saves this state every `every` steps of a loop.
    pub fn saver<M: burn::module::Module>(&self, every: usize) -> Saver<'_, M> {
        Saver {
            every,
            save: Box::new(move |m, o, st, extra| self.save(m, o, st, extra)),
        }
    }

    /// Where a (possibly resumed) run's metrics go.
    pub fn metrics_log(&self, resumed: Option<&[u8]>) -> Result<MetricsLog, StateError> {
        Ok(match resumed {
            Some(rows) => {
                fs_err::write(&self.metrics, rows)?;
                MetricsLog::append(&self.metrics)?
            }
            None => MetricsLog::create(&self.metrics)?,
        })
    }

    /// Removes the state (rank 0 of a data-parallel run, which wrote it).
    pub fn remove(&self) -> Result<(), StateError> {
        if posttrain_dist::world().is_root() && self.path.exists() {
            fs_err::remove_dir_all(&self.path)?;
        }
        Ok(())
    }
}
