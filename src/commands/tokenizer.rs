use anyhow::{Result, bail};
use posttrain_datasets::ChatTokenizer;
use posttrain_files::write_atomic;

use crate::cli::{TokenizerCommand, TokenizerTrainArgs};

pub fn run(command: TokenizerCommand) -> Result<()> {
    match command {
        TokenizerCommand::Train(args) => train(args),
    }
}

fn train(args: TokenizerTrainArgs) -> Result<()> {
    super::refuse_existing(Some(&args.out), args.overwrite)?;
    let mut lines = Vec::new();
    for path in &args.input {
        let text = fs_err::read_to_string(path)?;
        lines.extend(
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_string),
        );
    }
    if lines.is_empty() {
        bail!("no text in {:?}", args.input);
    }
    let tokenizer = ChatTokenizer::train(lines.iter(), args.vocab_size)?;
    let tmp = tempfile::tempdir()?;
    let staged = tmp.path().join("tokenizer.json");
    tokenizer.save(&staged)?;
    write_atomic(&args.out, &fs_err::read(&staged)?, args.overwrite)?;
    eprintln!(
        "tokenizer: {} tokens from {} lines -> {}",
        tokenizer.vocab_size(),
        lines.len(),
        args.out.display()
    );
    Ok(())
}
