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
}
