pub mod bench;
pub mod convert;
pub mod data;
pub mod generate;
pub mod inspect;
pub mod logits;
pub mod pretrain;
pub mod sample;
pub mod tokenizer;

/// Checks, before any work, that an output will not silently replace a file.
pub fn refuse_existing(out: Option<&std::path::Path>, overwrite: bool) -> anyhow::Result<()> {
    match out {
        Some(path) if path.exists() && !overwrite => anyhow::bail!(
            "{}: already exists (pass --overwrite to replace it)",
            path.display()
        ),
        _ => Ok(()),
    }
}
