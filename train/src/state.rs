//! What a training loop needs to continue where it stopped: steps done,
//! data position and its report so far. The command stores it with the
//! weights and the optimizer state every N steps; `--resume` hands it back.

use std::path::PathBuf;

use burn::module::Module;

use crate::Optimizer;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("report: {0}")]
    Report(#[from] serde_json::Error),
    #[error("{0}")]
    Save(String),
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
        let state = LoopState {
            step: done,
            epoch,
            next,
            report,
        };
        (self.save)(model, optim, &state, extra)
    }
}
