//! Data parallelism across processes: `mpirun -np N posttrain STAGE …` runs
//! N ranks of one command line. Each rank takes its share of every global
//! batch, the gradients are summed over the ranks once per step
//! ([`Dist::sum_f32`] over a flat host buffer) and every rank applies the
//! same optimizer step to identical weights; rank 0 alone prints and
//! writes. Without the `mpi` feature, or when no MPI launcher started the
//! process, the world is one process and every collective is the identity.

use std::ops::Range;
use std::sync::OnceLock;

#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error(
        "started as one of {0} processes (mpirun/srun), but this posttrain was built without MPI: rebuild it with `--features mpi`, or run it as one process"
    )]
    NotBuilt(usize),
    #[error("MPI is already initialised in this process")]
    Initialised,
    #[error("{what} of {count} is not divisible by the {size} ranks")]
    Indivisible {
        what: String,
        count: usize,
        size: usize,
    },
}

/// This process's place among the ranks of one run.
pub struct Dist {
    rank: usize,
    size: usize,
    #[cfg(feature = "mpi")]
    comm: Option<Comm>,
}

#[cfg(feature = "mpi")]
struct Comm(mpi::topology::SimpleCommunicator);

// SAFETY: MPI is initialised with `Threading::Funneled` and every collective
// is called from the main thread; the handle is only an id of
// MPI_COMM_WORLD.
#[cfg(feature = "mpi")]
unsafe impl Sync for Comm {}
#[cfg(feature = "mpi")]
unsafe impl Send for Comm {}

static SINGLE: Dist = Dist {
    rank: 0,
    size: 1,
    #[cfg(feature = "mpi")]
    comm: None,
};
static WORLD: OnceLock<Dist> = OnceLock::new();
/// Where a silenced rank still reports its error.
static ERRORS_FD: OnceLock<i32> = OnceLock::new();

/// The world of this process (one process until [`init`] found a launcher).
pub fn world() -> &'static Dist {
    WORLD.get().unwrap_or(&SINGLE)
}

/// Ends MPI when dropped (keep it alive for the whole process).
pub struct Session {
    #[cfg(feature = "mpi")]
    _universe: Option<mpi::environment::Universe>,
}

/// How many processes the launcher started, when one did: `mpirun` of Open
/// MPI or MPICH, or Slurm's `srun` (its step's task count; a batch script's
/// own process is one process, whatever the allocation).
pub fn launched_size() -> Option<usize> {
    let var = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<usize>().ok());
    var("OMPI_COMM_WORLD_SIZE")
        .or_else(|| var("PMI_SIZE"))
        .or_else(|| var("PMIX_SIZE"))
        .or_else(|| var("SLURM_STEP_NUM_TASKS"))
}

/// Joins the run's ranks when a launcher started this process; ranks other
/// than 0 then print nothing but their own error.
pub fn init() -> Result<Session, DistError> {
    #[cfg(not(feature = "mpi"))]
    match launched_size() {
        Some(size) if size > 1 => Err(DistError::NotBuilt(size)),
        _ => Ok(Session {}),
    }
    #[cfg(feature = "mpi")]
    {
        use mpi::topology::Communicator;
        if launched_size().is_none() {
            return Ok(Session { _universe: None });
        }
        let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Funneled)
            .ok_or(DistError::Initialised)?;
        let comm = universe.world();
        let (rank, size) = (comm.rank() as usize, comm.size() as usize);
        if rank > 0 {
            silence_output();
        }
        let _ = WORLD.set(Dist {
            rank,
            size,
            comm: Some(Comm(comm)),
        });
        if size > 1 {
            abort_on_panic();
        }
        Ok(Session {
            _universe: Some(universe),
        })
    }
}

/// Points stdout and stderr at /dev/null, keeping stderr for [`fail`].
#[cfg(feature = "mpi")]
fn silence_output() {
    // SAFETY: plain descriptor calls on descriptors this process owns.
    unsafe {
        let saved = libc::dup(2);
        if saved < 0 {
            return;
        }
        let _ = ERRORS_FD.set(saved);
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
        if null >= 0 {
            libc::dup2(null, 1);
            libc::dup2(null, 2);
            libc::close(null);
        }
    }
}

#[cfg(feature = "mpi")]
fn abort_on_panic() {
    std::panic::set_hook(Box::new(|info| {
        fail(&format!("panic: {info}"));
    }));
}

/// Prints `message` as this rank's one-line error (naming the rank when
/// there are several) on the stderr it started with; with several ranks it
/// then aborts the whole run, so no rank waits for one that is gone.
pub fn fail(message: &str) {
    let w = world();
    let line = if w.size > 1 {
        format!("error: rank {} of {}: {message}\n", w.rank, w.size)
    } else {
        format!("error: {message}\n")
    };
    match ERRORS_FD.get() {
        // SAFETY: writing a byte buffer to a descriptor this process owns.
        Some(&fd) => unsafe {
            libc::write(fd, line.as_ptr().cast(), line.len());
        },
        None => eprint!("{line}"),
    }
    if w.size > 1 {
        w.abort(1);
    }
}

impl Dist {
    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Rank 0 prints, logs and writes.
    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// This rank's contiguous share of `n` rows (`n` divisible by the size).
    pub fn share(&self, n: usize) -> Range<usize> {
        n * self.rank / self.size..n * (self.rank + 1) / self.size
    }

    /// This rank's rows of `n` rows taken in whole batches of `batch` (the
    /// batches one process forms, shared out in contiguous runs).
    pub fn share_batches(&self, n: usize, batch: usize) -> Range<usize> {
        let batch = batch.max(1);
        let own = self.share(n.div_ceil(batch));
        (own.start * batch).min(n)..(own.end * batch).min(n)
    }

    /// Refuses `count` (`what`: "--batch-size 6") unless the ranks split it evenly.
    pub fn check_divisible(&self, what: &str, count: usize) -> Result<(), DistError> {
        if count.is_multiple_of(self.size) {
            Ok(())
        } else {
            Err(DistError::Indivisible {
                what: what.to_string(),
                count,
                size: self.size,
            })
        }
    }

    /// Element-wise sum over the ranks, in place, the same on every rank.
    pub fn sum_f64(&self, values: &mut [f64]) {
        #[cfg(feature = "mpi")]
        if let Some(c) = &self.comm {
            all_reduce_sum(&c.0, values);
        }
        #[cfg(not(feature = "mpi"))]
        let _ = values;
    }

    /// [`Dist::sum_f64`] for `f32` (gradients).
    pub fn sum_f32(&self, values: &mut [f32]) {
        #[cfg(feature = "mpi")]
        if let Some(c) = &self.comm {
            all_reduce_sum(&c.0, values);
        }
        #[cfg(not(feature = "mpi"))]
        let _ = values;
    }

    /// Every rank's `local` values, concatenated in rank order, on every rank.
    pub fn all_gather_f64(&self, local: &[f64]) -> Vec<f64> {
        #[cfg(feature = "mpi")]
        if let Some(c) = &self.comm {
            let counts = self.all_counts(local.len());
            let displs = displacements(&counts);
            let mut out = vec![0f64; counts.iter().sum::<i32>() as usize];
            let mut part = mpi::datatype::PartitionMut::new(&mut out[..], &counts[..], &displs[..]);
            mpi::collective::CommunicatorCollectives::all_gather_varcount_into(
                &c.0, local, &mut part,
            );
            return out;
        }
        local.to_vec()
    }

    /// [`Dist::all_gather_f64`] for counts (exact below 2⁵³).
    pub fn all_gather_usize(&self, local: &[usize]) -> Vec<usize> {
        let local: Vec<f64> = local.iter().map(|&x| x as f64).collect();
        self.all_gather_f64(&local)
            .into_iter()
            .map(|x| x as usize)
            .collect()
    }

    /// Ends every rank of the run with `code`.
    pub fn abort(&self, code: i32) -> ! {
        #[cfg(feature = "mpi")]
        if let Some(c) = &self.comm {
            mpi::topology::Communicator::abort(&c.0, code);
        }
        std::process::exit(code)
    }

    #[cfg(feature = "mpi")]
    fn all_counts(&self, n: usize) -> Vec<i32> {
        let c = &self.comm.as_ref().expect("a communicator").0;
        let mut counts = vec![0i32; self.size];
        mpi::collective::CommunicatorCollectives::all_gather_into(c, &(n as i32), &mut counts[..]);
        counts
    }
}

#[cfg(feature = "mpi")]
fn displacements(counts: &[i32]) -> Vec<i32> {
    counts
        .iter()
        .scan(0i32, |at, &n| {
            let here = *at;
            *at += n;
            Some(here)
        })
        .collect()
}

/// Sums in buckets of 16M elements (a bounded send copy).
#[cfg(feature = "mpi")]
fn all_reduce_sum<T>(comm: &mpi::topology::SimpleCommunicator, values: &mut [T])
where
    T: mpi::datatype::Equivalence + Copy,
{
    use mpi::collective::{CommunicatorCollectives, SystemOperation};
    const BUCKET: usize = 1 << 24;
    for chunk in values.chunks_mut(BUCKET) {
        let send = chunk.to_vec();
        comm.all_reduce_into(&send[..], chunk, SystemOperation::sum());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_the_rows_in_rank_order() {
        let d = |rank, size| Dist {
            rank,
            size,
            #[cfg(feature = "mpi")]
            comm: None,
        };
        assert_eq!(d(0, 2).share(6), 0..3);
        assert_eq!(d(1, 2).share(6), 3..6);
        assert_eq!(d(2, 4).share(8), 4..6);
        // 7 rows in batches of 2: batches 0-1 and 2-3 (the last one short)
        assert_eq!(d(0, 2).share_batches(7, 2), 0..4);
        assert_eq!(d(1, 2).share_batches(7, 2), 4..7);
        // 2 batches over 4 ranks: two ranks get none
        assert_eq!(d(0, 4).share_batches(3, 2), 0..0);
        assert_eq!(d(1, 4).share_batches(3, 2), 0..2);
        assert_eq!(d(3, 4).share_batches(3, 2), 2..3);
        assert!(d(0, 3).check_divisible("--batch-size", 6).is_ok());
        let e = d(0, 4).check_divisible("--batch-size", 6).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--batch-size of 6 is not divisible by the 4 ranks"
        );
    }

    #[test]
    fn one_process_collectives_are_the_identity() {
        let w = &SINGLE;
        let mut v = [1.5f64, -2.0];
        w.sum_f64(&mut v);
        assert_eq!(v, [1.5, -2.0]);
        assert_eq!(w.all_gather_f64(&[3.0]), vec![3.0]);
        assert_eq!(w.all_gather_usize(&[7, 2]), vec![7, 2]);
        assert_eq!(w.share(5), 0..5);
    }
}
