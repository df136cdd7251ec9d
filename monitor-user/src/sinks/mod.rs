//! Where heartbeats go.
pub mod coordinator;
pub mod stdout;
