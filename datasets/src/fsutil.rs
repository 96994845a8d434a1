//! Files that appear whole or not at all: written to a temp file in the same
//! directory, flushed, then renamed over the final name.

use std::io::Write;
use std::path::Path;

pub fn write_atomic(path: &Path, bytes: &[u8], overwrite: bool) -> std::io::Result<()> {
    if path.exists() && !overwrite {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!(
                "{}: already exists (pass --overwrite to replace it)",
                path.display()
            ),
        ));
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".posttrain-")
        .tempfile_in(parent)
        .map_err(|e| {
            std::io::Error::new(e.kind(), format!("{}: cannot write: {e}", parent.display()))
        })?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| {
        std::io::Error::new(e.error.kind(), format!("{}: {}", path.display(), e.error))
    })?;
    Ok(())
}
