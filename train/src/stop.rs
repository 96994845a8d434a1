//! SIGTERM and SIGINT. While a training loop runs, the first signal asks it
//! to finish the step in progress, save the resumable state and stop
//! (`stopped` tells where). Anywhere else (a data stage, loading, a second
//! signal) the process removes what it was writing, prints one line and
//! exits at once with 128 + the signal: outputs are whole or absent. Under
//! `mpirun` the ranks of a training loop agree through one sum per step, so
//! every rank stops after the same step.

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};

use signal_hook::consts::{SIGINT, SIGTERM};

static SIGNAL: AtomicI32 = AtomicI32::new(0);
static GRACEFUL: AtomicBool = AtomicBool::new(false);
static STOPPED_AT: AtomicUsize = AtomicUsize::new(usize::MAX);
static COMMAND: Mutex<&'static str> = Mutex::new("posttrain");
/// Where the work stands: (done, total, unit), from [`crate::Progress`].
static POSITION: Mutex<Option<(u64, u64, &'static str)>> = Mutex::new(None);

/// Catches SIGTERM and SIGINT from now on, for `command` (its name in the
/// line printed when a signal stops it).
pub fn install(command: &'static str) -> std::io::Result<()> {
    *COMMAND.lock().unwrap_or_else(|e| e.into_inner()) = command;
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                let first = SIGNAL.swap(signal, Ordering::SeqCst) == 0;
                if !(first && GRACEFUL.load(Ordering::SeqCst)) {
                    exit_now(signal, !first);
                }
            }
        })?;
    Ok(())
}

/// From now on the first signal asks the training loop to stop after its
/// step instead of ending the process.
pub(crate) fn stop_after_the_step() {
    GRACEFUL.store(true, Ordering::SeqCst);
}

/// Removes what is being written, says so in one line and exits with
/// 128 + `signal`.
fn exit_now(signal: i32, second: bool) -> ! {
    let targets = posttrain_files::staging::abandon();
    let command = *COMMAND.lock().unwrap_or_else(|e| e.into_inner());
    let mut line = format!(
        "{command}: stopped {}by {}",
        if second { "at once " } else { "" },
        name(signal)
    );
    if let Some((done, total, unit)) = *POSITION.lock().unwrap_or_else(|e| e.into_inner()) {
        line += &format!(" at {done}/{total} {unit}");
    }
    let targets: Vec<String> = targets.iter().map(|t| t.display().to_string()).collect();
    match targets.is_empty() {
        true => line += "; nothing was being written",
        false => line += &format!("; not written: {}", targets.join(", ")),
    }
    if GRACEFUL.load(Ordering::SeqCst) {
        // a training run's state sits beside its output: OUT.state
        let saved = targets
            .iter()
            .find(|t| Path::new(&format!("{t}.state")).is_dir());
        line += &match saved {
            Some(t) => format!("; --resume continues from {t}.state, its last save"),
            None => "; no state was saved yet".into(),
        };
    }
    eprintln!("{line}");
    signal_hook::low_level::exit(128 + signal)
}

/// Records how far the work is, for the line a signal prints.
pub(crate) fn set_position(done: u64, total: u64, unit: &'static str) {
    *POSITION.lock().unwrap_or_else(|e| e.into_inner()) = Some((done, total, unit));
}

/// The signal this process received, if any.
pub fn requested() -> Option<i32> {
    Some(SIGNAL.load(Ordering::SeqCst)).filter(|&s| s != 0)
}

/// Whether any rank received a signal (one sum over the ranks), and which.
pub fn agreed() -> Option<i32> {
    let own = requested().unwrap_or(0);
    let world = posttrain_dist::world();
    if world.size() == 1 {
        return (own != 0).then_some(own);
    }
    let mut any = [f64::from(own)];
    world.sum_f64(&mut any);
    (any[0] > 0.0).then_some(if own != 0 { own } else { SIGTERM })
}

/// Records that the loop stopped after `step` steps with its state saved.
pub fn mark_stopped(step: usize) {
    STOPPED_AT.store(step, Ordering::SeqCst);
}

/// `(signal, steps done)` when a signal stopped the loop.
pub fn stopped() -> Option<(i32, usize)> {
    let step = STOPPED_AT.load(Ordering::SeqCst);
    (step != usize::MAX).then(|| (requested().unwrap_or(SIGTERM), step))
}

pub fn name(signal: i32) -> &'static str {
    match signal {
        SIGINT => "SIGINT",
        _ => "SIGTERM",
    }
}
