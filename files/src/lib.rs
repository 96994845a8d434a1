//! Output files that appear whole or not at all: written to a temporary
//! file in the same directory, flushed to disk, then renamed over the final
//! name; and the one check that refuses to replace an output silently.

pub mod staging;

use std::io::{Error, ErrorKind, Write};
use std::path::Path;

/// Refuses an existing `path` unless `overwrite`.
pub fn refuse_existing(path: &Path, overwrite: bool) -> std::io::Result<()> {
    if path.exists() && !overwrite {
        return Err(Error::new(
            ErrorKind::AlreadyExists,
            format!(
                "{}: already exists (pass --overwrite to replace it)",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// Writes `bytes` to `path` and flushes them to disk (for files inside a
/// directory that is itself renamed into place when complete).
pub fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = fs_err::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Writes `bytes` to `path` atomically: a reader sees the old file or the
/// whole new one, and a killed process leaves at most a hidden
/// `.posttrain-*` temporary file beside it.
///
/// Ranks other than 0 of a data-parallel run write nothing (rank 0 writes
/// the outputs).
pub fn write_atomic(path: &Path, bytes: &[u8], overwrite: bool) -> std::io::Result<()> {
    if !posttrain_dist::world().is_root() {
        return Ok(());
    }
    refuse_existing(path, overwrite)?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".posttrain-")
        .tempfile_in(parent)
        .map_err(|e| Error::new(e.kind(), format!("{}: cannot write: {e}", parent.display())))?;
    let registration = staging::register(tmp.path(), path);
    // the OS's reason alone: the temporary file's name means nothing to a reader
    let cannot = |e: Error| Error::new(e.kind(), format!("{}: cannot write: {e}", path.display()));
    tmp.as_file_mut().write_all(bytes).map_err(cannot)?;
    tmp.as_file().sync_all().map_err(cannot)?;
    registration
        .commit(|| tmp.persist(path))
        .map_err(|e| cannot(e.error))?;
    Ok(())
}

/// Swaps what `a` and `b` name in one step (Linux `renameat2` with
/// `RENAME_EXCHANGE`), so a process killed at any moment leaves each name
/// holding one whole directory. `Ok(false)`: the platform or file system
/// cannot exchange, and nothing was done.
pub fn exchange(a: &Path, b: &Path) -> std::io::Result<bool> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(Error::other);
        let (ca, cb) = (c(a)?, c(b)?);
        // SAFETY: both are NUL-terminated paths that outlive the call.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                ca.as_ptr(),
                libc::AT_FDCWD,
                cb.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        if rc == 0 {
            return Ok(true);
        }
        let e = Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => Ok(false),
            _ => Err(Error::new(
                e.kind(),
                format!("{} <-> {}: cannot exchange: {e}", a.display(), b.display()),
            )),
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = (a, b);
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_existing_file_is_kept_unless_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        write_atomic(&path, b"one", false).unwrap();
        let err = write_atomic(&path, b"two", false).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists);
        assert!(
            err.to_string().contains("out.jsonl: already exists"),
            "{err}"
        );
        assert_eq!(fs_err::read(&path).unwrap(), b"one");
        write_atomic(&path, b"two", true).unwrap();
        assert_eq!(fs_err::read(&path).unwrap(), b"two");
        // nothing but the output is left in the directory
        assert_eq!(fs_err::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn exchange_swaps_two_directories() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        for (d, text) in [(&a, "old"), (&b, "new")] {
            fs_err::create_dir(d).unwrap();
            fs_err::write(d.join("f"), text).unwrap();
        }
        if exchange(&a, &b).unwrap() {
            assert_eq!(fs_err::read_to_string(a.join("f")).unwrap(), "new");
            assert_eq!(fs_err::read_to_string(b.join("f")).unwrap(), "old");
        } else {
            assert_eq!(fs_err::read_to_string(a.join("f")).unwrap(), "old");
        }
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        {
            let missing = dir.path().join("missing");
            let err = exchange(&a, &missing).unwrap_err();
            assert!(
                err.to_string().contains("missing: cannot exchange"),
                "{err}"
            );
        }
    }
}
