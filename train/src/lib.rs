//! What every stage's loop shares: the learning-rate schedule, global-norm
//! gradient clipping, the metrics log and progress display.

pub mod clip;
pub mod metrics;
pub mod progress;
pub mod schedule;

pub use clip::clip_global_norm;
pub use metrics::MetricsLog;
pub use progress::Progress;
pub use schedule::warmup_cosine;
