//! hive-monitor's loader and daemon. Data flows one way:
//! `probes` (kernel) and `sources` (files) → `sampler` (collects readings) → `sample` (merges,
//! decides rates and nulls) → `heartbeat` (formats the wire record of `monitor-wire`) →
//! `sinks` (output) and `top` (a live view).
//!
//! Maps keyed by pids and cgroup ids hash with FxHash: every pass looks up each task and
//! worker several times, std's SipHash cost several times as much, and the keys come from
//! the kernel, not from someone who could choose them to collide.
pub mod cli;
pub mod error;
pub mod heartbeat;
pub mod lock;
pub mod privilege;
pub mod probes;
pub mod record;
pub mod sample;
pub mod sampler;
pub mod sinks;
pub mod sources;
pub mod spawn;
pub mod top;
