//! What every stage's loop shares: AdamW with the learning-rate schedule,
//! gradient accumulation and global-norm clipping, the metrics log and the
//! progress display.

pub mod adamw;
pub mod all_reduce;
pub mod batch;
pub mod clip;
pub mod logprobs;
pub mod memory;
pub mod metrics;
pub mod optimizer;
pub mod progress;
pub mod rollout;
pub mod schedule;
pub mod state;
pub mod stop;
pub mod train_loop;

pub use batch::{Vocab, make_batch};
pub use clip::clip_global_norm;
pub use metrics::MetricsLog;
pub use optimizer::{OptimConfig, Optimizer, StepStats};
pub use posttrain_dist as dist;
pub use progress::Progress;
pub use schedule::warmup_cosine;
pub use state::{LoopState, Resume, SaveFn, Saver, StateDir, StateError};
pub use train_loop::{
    At, Draw, LoopError, LossSummary, Run, Schedule, Share, Stage, Step, StepLog, train,
};
