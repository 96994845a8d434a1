//! Progress of long work: a bar with tokens/s and ETA on a terminal, plain
//! log lines (every few seconds) otherwise.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

pub struct Progress {
    label: String,
    unit: &'static str,
    total: u64,
    done: u64,
    tokens: u64,
    start: Instant,
    last_log: Instant,
    bar: Option<ProgressBar>,
}

const LOG_EVERY: Duration = Duration::from_secs(5);

impl Progress {
    pub fn new(label: &str, total: u64, unit: &'static str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} eta {eta}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            bar.set_prefix(label.to_string());
            bar
        });
        let now = Instant::now();
        crate::stop::set_position(0, total, unit);
        Self {
            label: label.to_string(),
            unit,
            total,
            done: 0,
            tokens: 0,
            start: now,
            last_log: now,
            bar,
        }
    }

    pub fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.start.elapsed().as_secs_f64().max(1e-9)
    }

    /// `n` more units done, which processed `tokens` tokens.
    pub fn advance(&mut self, n: u64, tokens: u64) {
        self.done += n;
        self.tokens += tokens;
        crate::stop::set_position(self.done, self.total, self.unit);
        let rate = format!("{:.0} tok/s", self.tokens_per_s());
        match &self.bar {
            Some(bar) => {
                bar.set_position(self.done);
                bar.set_message(rate);
            }
            None => {
                if self.last_log.elapsed() >= LOG_EVERY || self.done == self.total {
                    self.last_log = Instant::now();
                    let elapsed = self.start.elapsed().as_secs_f64();
                    let eta = elapsed / self.done.max(1) as f64 * (self.total - self.done) as f64;
                    eprintln!(
                        "{}: {}/{} {}, {rate}, eta {eta:.0}s",
                        self.label, self.done, self.total, self.unit
                    );
                }
            }
        }
    }

    /// A log line that does not tear the bar.
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    pub fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}
