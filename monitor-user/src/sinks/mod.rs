//! Where heartbeats go.
pub mod stdout;
