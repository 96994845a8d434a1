//! `metrics.jsonl`: one JSON object per logged step, flushed as written so a
//! notebook can follow a running stage.

use std::io::{BufWriter, Write};
use std::path::Path;

use serde_json::Value;

pub struct MetricsLog {
    out: BufWriter<fs_err::File>,
}

impl MetricsLog {
    pub fn create(path: &Path) -> std::io::Result<Self> {
        Ok(Self {
            out: BufWriter::new(fs_err::File::create(path)?),
        })
    }

    /// Continues an existing file (a resumed run).
    pub fn append(path: &Path) -> std::io::Result<Self> {
        let file = fs_err::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)?;
        Ok(Self {
            out: BufWriter::new(file),
        })
    }

    pub fn log(&mut self, row: &Value) -> std::io::Result<()> {
        writeln!(self.out, "{row}")?;
        self.out.flush()
    }
}
