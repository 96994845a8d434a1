//! Two halves of a short job on two cores, for work too small to wake a
//! sleeping thread for: a decoding step's matrix products take 10–100 µs
//! each, about what rayon needs to wake a parked worker. The second thread
//! here spins for [`SPIN`] after each job before it parks, so back-to-back
//! products (one decoding step after another) find it awake.

use std::cell::UnsafeCell;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

/// How long the second thread stays awake after a job.
const SPIN: Duration = Duration::from_micros(300);

type Job = *mut (dyn FnMut() + Send);

struct Helper {
    /// A caller owns the helper between posting a job and collecting it.
    busy: AtomicBool,
    posted: AtomicU64,
    finished: AtomicU64,
    sleeping: AtomicBool,
    job: UnsafeCell<Option<Job>>,
    /// The last job panicked (set before `finished`).
    panicked: AtomicBool,
    thread: OnceLock<Thread>,
}

// SAFETY: `job` is written only by the caller that holds `busy`, before it
// publishes the job through `posted`, and read by the helper thread only
// after it sees that store; the caller waits on `finished` before it
// releases `busy`, so the job outlives its use.
unsafe impl Sync for Helper {}

static HELPER: OnceLock<&'static Helper> = OnceLock::new();

fn helper() -> &'static Helper {
    HELPER.get_or_init(|| {
        let h: &'static Helper = Box::leak(Box::new(Helper {
            busy: AtomicBool::new(false),
            posted: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            sleeping: AtomicBool::new(false),
            job: UnsafeCell::new(None),
            panicked: AtomicBool::new(false),
            thread: OnceLock::new(),
        }));
        let handle = thread::Builder::new()
            .name("posttrain-pair".into())
            .spawn(move || serve(h))
            .expect("spawn the second decoding thread");
        h.thread.set(handle.thread().clone()).expect("set once");
        h
    })
}

fn serve(h: &'static Helper) {
    let mut done = 0;
    loop {
        let mut since = Instant::now();
        let mut spins = 0u32;
        while h.posted.load(SeqCst) == done {
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) && since.elapsed() > SPIN {
                h.sleeping.store(true, SeqCst);
                if h.posted.load(SeqCst) == done {
                    thread::park();
                }
                h.sleeping.store(false, SeqCst);
                since = Instant::now();
            }
        }
        done += 1;
        // SAFETY: see `impl Sync for Helper`.
        let job = unsafe { (*h.job.get()).take() }.expect("a posted job");
        // SAFETY: the poster keeps the closure alive until `finished` reaches
        // this job (see `join`), and only this thread calls it.
        let run = std::panic::AssertUnwindSafe(|| unsafe { (*job)() });
        if std::panic::catch_unwind(run).is_err() {
            h.panicked.store(true, SeqCst);
        }
        h.finished.store(done, SeqCst);
    }
}

/// Whether this process may use two cores (rayon's pool, which follows
/// `RAYON_NUM_THREADS` and the CPU affinity an MPI launcher binds a rank
/// to): a spinning helper on the caller's only core would halve its speed.
pub fn has_two_cores() -> bool {
    static TWO: OnceLock<bool> = OnceLock::new();
    *TWO.get_or_init(|| rayon::current_num_threads() >= 2)
}

/// Runs `a` here and `b` on the second thread (or both through rayon if
/// another caller holds it) and returns when both are done.
pub fn join(a: impl FnOnce() + Send, b: impl FnOnce() + Send) {
    let h = helper();
    if h.busy.swap(true, SeqCst) {
        rayon::join(a, b);
        return;
    }
    let mut b = Some(b);
    let mut call = move || (b.take().expect("called once"))();
    let job: *mut (dyn FnMut() + Send + '_) = &mut call;
    // SAFETY: the job is only called before `finished` reaches `ticket`,
    // which this function waits for before `call` goes out of scope.
    let job: Job = unsafe { std::mem::transmute(job) };
    // SAFETY: `busy` is ours, so no other caller writes the slot, and the
    // helper reads it only after the store to `posted` below.
    unsafe { *h.job.get() = Some(job) };
    let ticket = h.posted.fetch_add(1, SeqCst) + 1;
    if h.sleeping.load(SeqCst) {
        h.thread.get().expect("started").unpark();
    }
    let a_panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(a));
    while h.finished.load(SeqCst) != ticket {
        std::hint::spin_loop();
    }
    let b_panicked = h.panicked.swap(false, SeqCst);
    h.busy.store(false, SeqCst);
    if let Err(payload) = a_panic {
        std::panic::resume_unwind(payload);
    }
    assert!(!b_panicked, "the second half of a pair job panicked");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn both_halves_run_once_each_from_many_callers() {
        let count = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for i in 0..500 {
                        let (mut x, mut y) = (0, 0);
                        join(|| x = i, || y = i + 1);
                        assert_eq!((x, y), (i, i + 1));
                        count.fetch_add(1, SeqCst);
                        if i % 100 == 0 {
                            std::thread::sleep(SPIN * 2);
                        }
                    }
                });
            }
        });
        assert_eq!(count.load(SeqCst), 2000);
    }

    #[test]
    fn a_panic_in_either_half_reaches_the_caller() {
        let r = std::panic::catch_unwind(|| join(|| (), || panic!("b")));
        assert!(r.is_err());
        let r = std::panic::catch_unwind(|| join(|| panic!("a"), || ()));
        assert!(r.is_err());
        let (mut x, mut y) = (0, 0);
        join(|| x = 1, || y = 2);
        assert_eq!((x, y), (1, 2));
    }
}
