//! posttrain-rlhf: see DESIGN.md; this crate is filled in by later stages.
