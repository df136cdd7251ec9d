//! Readers of kernel files. Each returns typed readings, never heartbeat JSON.
pub mod cgroup;
pub mod memory;
pub mod model;
pub mod nvml;
pub mod procfs;
