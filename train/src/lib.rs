//! What every stage's loop shares.

pub mod progress;

pub use progress::Progress;
