//! posttrain-reward: see DESIGN.md; this crate is filled in by later stages.
