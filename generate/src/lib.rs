//! The data stages that sample checkpoints rather than train them: a
//! teacher's completions of prompts (optionally with its top-k log-probs per
//! token) as SFT pairs, and preference pairs from policies' samples ranked by
//! a scorer.

pub mod prefs;
pub mod teacher;

pub use prefs::{Policy, PrefsConfig, PrefsError, PrefsReport, make_preferences};
pub use teacher::{GenerateReport, generate_pairs};
