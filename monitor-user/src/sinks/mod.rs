//! Where heartbeats go.
pub mod announce;
pub mod api;
pub mod coordinator;
pub mod metrics;
pub mod otlp;
pub mod stall;
pub mod stdout;
