//! Where heartbeats go.
pub mod api;
pub mod coordinator;
pub mod metrics;
pub mod stdout;
