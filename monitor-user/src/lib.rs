//! hive-monitor's loader and daemon. Data flows one way:
//! `probes` (kernel) and `sources` (files) → `sampler` (merge, rates) → `heartbeat` (model)
//! → `sinks` (output) and `top` (a live view).
pub mod cli;
pub mod config;
pub mod error;
pub mod heartbeat;
pub mod lock;
pub mod privilege;
pub mod probes;
pub mod queen;
pub mod rbee;
pub mod record;
pub mod sampler;
pub mod sinks;
pub mod sources;
pub mod spawn;
pub mod top;
