//! JSON lines on standard output, the default sink: `hive-monitor run | jq` works.
use std::io::Write;

use crate::heartbeat::Heartbeat;

pub struct Stdout {
    out: std::io::Stdout,
    /// The line being written, kept between heartbeats so its memory is reused.
    line: Vec<u8>,
}

impl Stdout {
    pub fn new() -> Self {
        Self { out: std::io::stdout(), line: Vec::new() }
    }

    /// Writes one heartbeat as one line and flushes, so a pipe reader sees it at once. The
    /// line is built first and written whole: standard output is line-buffered and would
    /// scan every one of serde's small writes for a newline.
    pub fn send(&mut self, heartbeat: &Heartbeat) -> std::io::Result<()> {
        self.line.clear();
        serde_json::to_writer(&mut self.line, heartbeat)?;
        self.line.push(b'\n');
        let mut out = self.out.lock();
        out.write_all(&self.line)?;
        out.flush()
    }
}

impl Default for Stdout {
    fn default() -> Self {
        Self::new()
    }
}
