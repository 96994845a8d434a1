mod backend;
mod charts;
mod cli;
mod commands;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};

/// glibc's malloc returns large freed blocks to the kernel, so every step
/// page-faults (and the kernel zeroes) its buffers again; mimalloc, told
/// never to purge, keeps them for the next step.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in the mimalloc v3 sources that
/// libmimalloc-sys 0.1.49 builds (its Rust bindings do not name it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn never_purge_freed_memory() {
    // SAFETY: setting an option is allowed at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

/// Writes to stdout; a closed pipe (`| head`) is not an error (Rust ignores
/// SIGPIPE, so the write fails with `BrokenPipe` instead of killing us).
pub(crate) fn print_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// The command's name, as its lines on stderr start.
fn name(command: &Command) -> &'static str {
    use crate::cli::{DataCommand, TokenizerCommand, WarpCommand};
    match command {
        Command::Data(DataCommand::Synth(_)) => "data synth",
        Command::Data(DataCommand::Score(_)) => "data score",
        Command::Data(DataCommand::Prefs(_)) => "data prefs",
        Command::Init(_) => "init",
        Command::Pretrain(_) => "pretrain",
        Command::Sft(_) => "sft",
        Command::Reward(_) => "reward",
        Command::Dpo(_) => "dpo",
        Command::Orpo(_) => "orpo",
        Command::Score(_) => "score",
        Command::Generate(_) => "generate",
        Command::Inspect(_) => "inspect",
        Command::Sample(_) => "sample",
        Command::Convert(_) => "convert",
        Command::Logits(_) => "logits",
        Command::Rlhf(_) => "rlhf",
        Command::Warp(WarpCommand::Merge(_)) => "warp merge",
        Command::Warp(WarpCommand::Ema(_)) => "warp ema",
        Command::Warp(WarpCommand::Average(_)) => "warp average",
        Command::Eval(_) => "eval",
        Command::Report(_) => "report",
        Command::Tokenizer(TokenizerCommand::Train(_)) => "tokenizer train",
        Command::Tokenizer(TokenizerCommand::Encode(_)) => "tokenizer encode",
        Command::Bench(_) => "bench",
    }
}

/// The commands that run data-parallel under `mpirun`.
const DATA_PARALLEL: [&str; 11] = [
    "pretrain",
    "sft",
    "reward",
    "dpo",
    "orpo",
    "rlhf",
    "generate",
    "data prefs",
    "score",
    "eval",
    "sample",
];

fn run(cli: Cli) -> anyhow::Result<()> {
    let name = name(&cli.command);
    posttrain_train::stop::install(name)?;
    let size = posttrain_dist::world().size();
    if size > 1 {
        if !DATA_PARALLEL.contains(&name) {
            anyhow::bail!(
                "this command does not run data-parallel: run it as one process (without mpirun/srun)"
            );
        }
        eprintln!("{name}: data-parallel over {size} processes");
    }
    let multiple = match (cli.length_multiple, cli.backend.compiles_kernels()) {
        (Some(n), _) => n as usize,
        (None, true) => 32,
        (None, false) => 1,
    };
    posttrain_model::pad_lengths_to(multiple);
    let on_device = match cli.sample_on {
        Some(place) => place == cli::SampleOn::Device,
        None => cli.backend.compiles_kernels(),
    };
    posttrain_model::sample_on_device(on_device);
    let env = &backend::Env::new(cli.backend);
    match cli.command {
        Command::Data(command) => commands::data::run(command, env),
        Command::Pretrain(args) => commands::pretrain::run(args, env),
        Command::Init(args) => commands::init::run(args, env),
        Command::Sft(args) => commands::sft::run(args, env),
        Command::Reward(args) => commands::reward::run(args, env),
        Command::Dpo(args) => commands::dpo::run(args, env),
        Command::Orpo(args) => commands::orpo::run(args, env),
        Command::Rlhf(args) => commands::rlhf::run(args, env),
        Command::Warp(command) => commands::warp::run(command, env),
        Command::Report(args) => commands::report::run(args),
        Command::Eval(args) => commands::eval::run(args, env),
        Command::Score(args) => commands::reward::score(args, env),
        Command::Generate(args) => commands::generate::run(args, env),
        Command::Inspect(args) => commands::inspect::run(args),
        Command::Tokenizer(command) => commands::tokenizer::run(command),
        Command::Sample(args) => commands::sample::run(args, env),
        Command::Convert(args) => commands::convert::run(args, env),
        Command::Logits(args) => commands::logits::run(args, env),
        Command::Bench(args) => commands::bench::run(args, env),
    }
}

fn main() -> ExitCode {
    never_purge_freed_memory();
    let cli = Cli::parse();
    let fail = |e: anyhow::Error| {
        let chain: Vec<String> = e.chain().map(ToString::to_string).collect();
        posttrain_dist::fail(&chain.join(": "));
        ExitCode::FAILURE
    };
    // held until every rank is done: dropping it ends MPI
    let _session = match posttrain_dist::init() {
        Ok(session) => session,
        Err(e) => return fail(e.into()),
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<commands::training::Stopped>() {
            Some(stopped) => {
                eprintln!("{}", stopped.line);
                ExitCode::from(stopped.code)
            }
            None => fail(e),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purge_delay_option_has_the_index_mimalloc_documents() {
        // SAFETY: reading and setting options is allowed at any time.
        let before = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(
            before, 1000,
            "mimalloc v3 defaults the purge delay to 1000 ms"
        );
        let next = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY + 1) };
        assert_eq!(next, 0, "use_numa_nodes (0 = all) follows purge_delay");
        never_purge_freed_memory();
        assert_eq!(
            unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) },
            -1
        );
    }
}
