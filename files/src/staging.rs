//! What is being written right now, so that a process told to stop at once
//! can remove it: every temporary file or directory is registered while it
//! exists, and its rename into place happens under the same lock, so an
//! output is either in place whole or its staging is removed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

struct Staged {
    id: u64,
    /// `None` for an output claimed before its writing starts.
    staging: Option<PathBuf>,
    target: PathBuf,
}

struct Registry {
    staged: Mutex<Vec<Staged>>,
    next: AtomicU64,
    abandoned: AtomicBool,
}

impl Registry {
    const fn new() -> Self {
        Self {
            staged: Mutex::new(Vec::new()),
            next: AtomicU64::new(0),
            abandoned: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Staged>> {
        self.staged.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register(&'static self, staging: Option<&Path>, target: &Path) -> Registration {
        let id = self.next.fetch_add(1, Ordering::SeqCst);
        self.lock().push(Staged {
            id,
            staging: staging.map(Path::to_path_buf),
            target: target.to_path_buf(),
        });
        Registration { id, registry: self }
    }

    fn abandon(&self) -> Vec<PathBuf> {
        let staged = self.lock();
        self.abandoned.store(true, Ordering::SeqCst);
        let mut targets = Vec::new();
        for x in staged.iter() {
            let _ = match &x.staging {
                Some(dir) if dir.is_dir() => std::fs::remove_dir_all(dir),
                Some(file) => std::fs::remove_file(file),
                None => Ok(()),
            };
            if !targets.contains(&x.target) {
                targets.push(x.target.clone());
            }
        }
        targets
    }
}

static REGISTRY: Registry = Registry::new();

/// A registered staging path; dropping it unregisters the path (its owner
/// removes or renames it).
pub struct Registration {
    id: u64,
    registry: &'static Registry,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Registration({})", self.id)
    }
}

/// Registers `staging`, the temporary form of `target`.
pub fn register(staging: &Path, target: &Path) -> Registration {
    REGISTRY.register(Some(staging), target)
}

/// Claims `target` for this process's output before anything is staged
/// for it (a stage that writes it at the end); its commit ends the claim.
pub fn claim(target: &Path) {
    std::mem::forget(REGISTRY.register(None, target));
}

impl Registration {
    /// Runs `rename` (the move into place) where [`abandon`] cannot
    /// interleave, and unregisters the path. After [`abandon`] the rename
    /// never happens: the thread waits for the process to exit.
    pub fn commit<T>(self, rename: impl FnOnce() -> T) -> T {
        let mut staged = self.registry.lock();
        if self.registry.abandoned.load(Ordering::SeqCst) {
            drop(staged);
            loop {
                std::thread::park();
            }
        }
        let out = rename();
        let target = staged
            .iter()
            .find(|x| x.id == self.id)
            .map(|x| x.target.clone());
        staged.retain(|x| {
            x.id != self.id && (x.staging.is_some() || Some(&x.target) != target.as_ref())
        });
        out
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.lock().retain(|x| x.id != self.id);
    }
}

/// Removes every registered staging path and returns their targets; no
/// commit happens afterwards (the caller exits).
pub fn abandon() -> Vec<PathBuf> {
    REGISTRY.abandon()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_paths_are_removed_and_committed_ones_are_not() {
        static OWN: Registry = Registry::new();
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join(".a.tmp"), dir.path().join(".b.tmp"));
        fs_err::create_dir_all(a.join("inner")).unwrap();
        fs_err::write(&b, b"x").unwrap();
        let _a = OWN.register(Some(&a), &dir.path().join("a"));
        let _claimed = OWN.register(None, &dir.path().join("b"));
        let rb = OWN.register(Some(&b), &dir.path().join("b"));
        rb.commit(|| fs_err::rename(&b, dir.path().join("b")))
            .unwrap();
        drop(OWN.register(Some(&dir.path().join(".c.tmp")), &dir.path().join("c")));
        let _d = OWN.register(None, &dir.path().join("d"));
        assert_eq!(
            OWN.abandon(),
            vec![dir.path().join("a"), dir.path().join("d")]
        );
        assert!(!a.exists());
        assert!(dir.path().join("b").is_file());
    }
}
