//! JSON lines on standard output, the default sink: `hive-monitor run | jq` works.
use std::io::Write;

use crate::heartbeat::Heartbeat;

pub struct Stdout {
    out: std::io::Stdout,
}

impl Stdout {
    pub fn new() -> Self {
        Self { out: std::io::stdout() }
    }

    /// Writes one heartbeat as one line and flushes, so a pipe reader sees it at once.
    pub fn send(&mut self, heartbeat: &Heartbeat) -> std::io::Result<()> {
        let mut out = self.out.lock();
        serde_json::to_writer(&mut out, heartbeat)?;
        out.write_all(b"\n")?;
        out.flush()
    }
}

impl Default for Stdout {
    fn default() -> Self {
        Self::new()
    }
}
