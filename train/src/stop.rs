//! SIGTERM and SIGINT during training: the loop finishes the step it is in,
//! saves the resumable state and stops (`stopped` tells where); a second
//! signal ends the process at once with 128 + its number. Under `mpirun` the
//! ranks agree through one sum per step, so every rank stops after the same
//! step.

use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};

use signal_hook::consts::{SIGINT, SIGTERM};

static SIGNAL: AtomicI32 = AtomicI32::new(0);
static STOPPED_AT: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Catches SIGTERM and SIGINT from now on.
pub fn install() -> std::io::Result<()> {
    for signal in [SIGTERM, SIGINT] {
        let action = move || {
            if SIGNAL.swap(signal, Ordering::SeqCst) != 0 {
                signal_hook::low_level::exit(128 + signal);
            }
        };
        // SAFETY: the action only swaps an atomic and calls `_exit`, both
        // async-signal-safe.
        unsafe { signal_hook::low_level::register(signal, action) }?;
    }
    Ok(())
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
