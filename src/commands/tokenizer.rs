use anyhow::{Result, bail};
use posttrain_datasets::ChatTokenizer;
use posttrain_files::write_atomic;

use crate::cli::{TokenizerCommand, TokenizerEncodeArgs, TokenizerTrainArgs};
use posttrain_datasets::tokenizer::Message;

pub fn run(command: TokenizerCommand) -> Result<()> {
    match command {
        TokenizerCommand::Train(args) => train(args),
        TokenizerCommand::Encode(args) => encode(args),
    }
}

fn encode(args: TokenizerEncodeArgs) -> Result<()> {
    let path = if args.tokenizer.is_dir() {
        args.tokenizer
            .join(posttrain_model::checkpoint::TOKENIZER_FILE)
    } else {
        args.tokenizer.clone()
    };
    let tokenizer = ChatTokenizer::from_file(&path)?;
    let messages: Vec<Message> = serde_json::from_str(&args.messages)
        .map_err(|e| anyhow::anyhow!("--messages: not a list of {{role, content}}: {e}"))?;
    if messages.is_empty() {
        bail!("--messages: the conversation is empty");
    }
    let ids = tokenizer.render_prompt(&messages)?;
    println!("{}", serde_json::json!({ "ids": ids }));
    Ok(())
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
