//! Where heartbeats go.
pub mod announce;
pub mod api;
pub mod coordinator;
pub mod metrics;
pub mod stall;
pub mod stdout;
