//! What the training loop needs to continue where it stopped: the data
//! position, the optimizer's state and the report so far. The command
//! stores it (with the weights) every N steps; `--resume` hands it back.

use std::path::PathBuf;

use posttrain_model::Gemma2ForCausalLM;
use posttrain_train::Optimizer;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoopState {
    /// Optimizer steps done.
    pub step: usize,
    pub epoch: u64,
    pub next: usize,
    pub first_loss: f64,
    pub tokens: u64,
    pub on_policy_batches: usize,
}

/// A saved state to continue from; the model given to the loop is the one
/// saved with it (with its parameter ids).
pub struct Resume {
    pub state: LoopState,
    /// What `Optimizer::save_state` wrote.
    pub optimizer: PathBuf,
}

pub type SaveFn<'a> = dyn FnMut(&Gemma2ForCausalLM, &Optimizer<Gemma2ForCausalLM>, &LoopState) -> Result<(), String>
    + 'a;

/// Saves the loop's state every `every` steps (0: never).
pub struct Saver<'a> {
    pub every: usize,
    pub save: &'a mut SaveFn<'a>,
}
