mod backend;
mod charts;
mod cli;
mod commands;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};

/// glibc's malloc returns large freed blocks to the kernel, so every
/// decoding step page-faults its buffers in again; mimalloc keeps them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Writes to stdout; a closed pipe (`| head`) is not an error.
pub(crate) fn print_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let backend_name = format!("{:?}", cli.backend).to_lowercase();
    match cli.command {
        Command::Data(command) => {
            commands::data::run(command, || backend::device(cli.backend), &backend_name)
        }
        Command::Pretrain(args) => {
            commands::pretrain::run(args, backend::device(cli.backend)?, &backend_name)
        }
        Command::Init(args) => {
            commands::init::run(args, backend::device(cli.backend)?, &backend_name)
        }
        Command::Sft(args) => {
            commands::sft::run(args, backend::device(cli.backend)?, &backend_name)
        }
        Command::Reward(args) => {
            commands::reward::run(args, backend::device(cli.backend)?, &backend_name)
        }
        Command::Rlhf(args) => {
            commands::rlhf::run(args, backend::device(cli.backend)?, &backend_name)
        }
        Command::Warp(command) => {
            commands::warp::run(command, backend::device(cli.backend)?, &backend_name)
        }
        Command::Report(args) => commands::report::run(args),
        Command::Eval(args) => {
            commands::eval::run(args, backend::device(cli.backend)?, &backend_name)
        }
        Command::Score(args) => commands::reward::score(args, backend::device(cli.backend)?),
        Command::Generate(args) => {
            commands::generate::run(args, backend::device(cli.backend)?, &backend_name)
        }
        Command::Inspect(args) => commands::inspect::run(args),
        Command::Tokenizer(command) => commands::tokenizer::run(command),
        Command::Sample(args) => commands::sample::run(args, backend::device(cli.backend)?),
        Command::Convert(args) => {
            commands::convert::run(args, backend::device(cli.backend)?, &backend_name)
        }
        Command::Logits(args) => commands::logits::run(args, backend::device(cli.backend)?),
        Command::Bench(args) => {
            commands::bench::run(args, backend::device(cli.backend)?, &backend_name)
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(ToString::to_string).collect();
            eprintln!("error: {}", chain.join(": "));
            ExitCode::FAILURE
        }
    }
}
