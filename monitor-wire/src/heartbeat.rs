//! The heartbeat: the reference `HiveHeartbeat` shape (every reference field name) plus
//! additive extensions. Figures not collected are `null`, never a made-up 0.
use std::{collections::BTreeMap, sync::Arc};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The heartbeat format this crate describes; a consumer refuses others.
pub const SCHEMA_VERSION: u32 = 1;

/// Where a figure came from.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Ebpf,
    Procfs,
    Cgroup,
    Nvml,
    Unavailable,
    /// Nothing to measure: the host has no GPU (NVML is unavailable and no NVIDIA driver
    /// is loaded).
    None,
}

/// A hive's report on itself and its workers, sent once per interval.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[schemars(title = "HiveHeartbeat")]
pub struct Heartbeat {
    pub schema_version: u32,
    /// Increases by one per heartbeat from 1; a gap means heartbeats were missed.
    pub seq: u64,
    /// Wall length of the interval the rates cover, ms.
    pub interval_ms: f64,
    pub hive: Hive,
    /// RFC 3339, UTC, seconds.
    pub timestamp: String,
    pub workers: Vec<Worker>,
    /// GPU-pressure signals: a device above the utilisation threshold, at most once a
    /// minute per device. Usually empty.
    pub prewarm: Vec<PrewarmSignal>,
    pub collector: Collector,
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct PrewarmSignal {
    pub device_index: u32,
    pub uuid: Option<String>,
    pub gpu_utilization_percent: f64,
    pub temperature_c: Option<u32>,
    pub reason: String,
}

/// One GPU: the reference fields, then extensions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DeviceVitals {
    pub device_index: u32,
    pub vram_used_gb: Option<f64>,
    pub vram_total_gb: Option<f64>,
    /// VRAM used, percent of total.
    pub vram_utilization_percent: Option<f64>,
    pub name: Option<String>,
    pub uuid: Option<String>,
    pub gpu_utilization_percent: Option<f64>,
    pub temperature_c: Option<u32>,
    /// Exact sizes, bytes (the `_gb` fields above are rounded).
    pub vram_used_bytes: Option<u64>,
    pub vram_total_bytes: Option<u64>,
}

/// Identity and host vitals of this host.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct Hive {
    pub id: String,
    pub hostname: String,
    pub port: u16,
    pub operational_status: String,
    pub health_status: String,
    pub version: String,
    pub cpu_usage_percent: Option<f64>,
    pub ram_used_gb: Option<f64>,
    pub ram_total_gb: Option<f64>,
    /// `null` when GPU figures are unavailable (no NVML).
    pub vram_per_device: Option<Vec<DeviceVitals>>,
    /// Seconds this daemon has been running.
    pub uptime_seconds: u64,
    /// The file system holding the model directory; `null` when none is configured.
    pub model_dir_disk: Option<DiskUsage>,
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct DiskUsage {
    pub used_gb: f64,
    pub total_gb: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct Worker {
    pub pid: Option<u32>,
    pub group: Arc<str>,
    pub instance: Arc<str>,
    pub cpu_pct: Option<f64>,
    /// Memory charged to the worker's memory cgroup (or its processes' summed RSS when that
    /// cgroup is shared; see `memory.source`), MiB.
    pub rss_mb: Option<u64>,
    pub gpu_util_pct: Option<f64>,
    pub vram_mb: Option<u64>,
    pub model: Option<Arc<str>>,
    pub uptime_s: Option<u64>,
    pub io_r_mb_s: Option<f64>,
    pub io_w_mb_s: Option<f64>,
    // Extensions.
    /// The worker's cgroup path below the cgroup2 root.
    pub cgroup: Arc<str>,
    pub cgroup_id: u64,
    pub processes: usize,
    /// `null` where CPU time is not measured (without BPF, when `cpu.stat` cannot be read).
    pub cpu_ns_total: Option<u64>,
    /// Share of the interval the worker's tasks spent runnable but not running (100 = one
    /// task waiting the whole interval).
    pub runq_wait_pct: Option<f64>,
    /// The scheduler totals are `null` without BPF.
    pub runq_wait_ns_total: Option<u64>,
    pub runq_waits_total: Option<u64>,
    pub ctx_switches_voluntary_total: Option<u64>,
    pub ctx_switches_involuntary_total: Option<u64>,
    /// System-call level I/O, MB (10^6 bytes) per second and cumulative bytes: what the
    /// worker's tasks asked read/write-type calls to move (`rchar`/`wchar` semantics), not
    /// what reached storage (that is `io_r_mb_s`/`io_w_mb_s`). Without BPF they come from the
    /// processes' `/proc/<pid>/io`, and are `null` when one of those cannot be read.
    pub io_syscall_r_mb_s: Option<f64>,
    pub io_syscall_w_mb_s: Option<f64>,
    pub io_syscall_read_bytes_total: Option<u64>,
    pub io_syscall_write_bytes_total: Option<u64>,
    /// Storage-level cumulative bytes, of which `io_r_mb_s`/`io_w_mb_s` are the rates: read
    /// requests sent to block devices (`read_bytes` semantics), and page-cache pages dirtied
    /// on written-back file systems plus direct writes (`write_bytes` semantics).
    pub io_read_bytes_total: Option<u64>,
    pub io_write_bytes_total: Option<u64>,
    /// Processes the worker's tasks forked, programs they exec'd, and processes that ended,
    /// cumulative, as the kernel's fork/exec/exit tracepoints saw them; `null` without BPF.
    pub processes_forked_total: Option<u64>,
    pub execs_total: Option<u64>,
    pub processes_exited_total: Option<u64>,
    pub memory: Option<WorkerMemory>,
    /// Per device the worker is on; `null` when GPU figures are unavailable.
    pub gpus: Option<Vec<WorkerGpuDevice>>,
    /// Pressure stall information of the worker's v2 cgroup (`cpu.pressure`,
    /// `memory.pressure`, `io.pressure`). Absent from heartbeats of daemons before it.
    #[serde(default)]
    pub pressure: WorkerPressure,
}

/// Per resource; `null` where the kernel has no such file.
#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
pub struct WorkerPressure {
    pub cpu: Option<PressureStall>,
    pub memory: Option<PressureStall>,
    pub io: Option<PressureStall>,
}

/// Time the worker's tasks were stalled on one resource: `some` while at least one was,
/// `full` while every non-idle one was at once. `full` is `null` where the kernel prints no
/// such line (CPU before 5.13).
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct PressureStall {
    /// Cumulative stalled time, ns (the file's `total`, µs × 1000).
    pub some_ns_total: Option<u64>,
    pub full_ns_total: Option<u64>,
    /// Percent of the interval stalled (0 to 100), from the growth of `total`; `null` when
    /// the file was not read at the previous pass (a worker that has just appeared).
    pub some_pct: Option<f64>,
    pub full_pct: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct WorkerGpuDevice {
    pub device_index: u32,
    /// `null` when the driver does not report a process's use.
    pub vram_bytes: Option<u64>,
    /// Mean SM utilisation of the worker's processes on this device over the interval.
    pub sm_util_pct: Option<f64>,
}

/// A worker's memory breakdown, bytes.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct WorkerMemory {
    /// `cgroup` (its memory cgroup's files); else, because its memory cgroup holds others
    /// too, summed over its processes: `ebpf` (their counters, read by the task iterator) or
    /// `procfs` (their `/proc/<pid>/statm`).
    pub source: Source,
    pub current_bytes: u64,
    pub anon_bytes: Option<u64>,
    pub file_bytes: Option<u64>,
    pub peak_bytes: Option<u64>,
    /// `null`: no limit, or not known.
    pub limit_bytes: Option<u64>,
    pub oom_kills: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct Collector {
    pub cpu: Source,
    pub runq: Source,
    pub ctx_switches: Source,
    pub memory: Source,
    /// Storage-level reads (`io_r_mb_s`, `io_read_bytes_total`).
    pub io_read: Source,
    /// Storage-level writes (`io_w_mb_s`, `io_write_bytes_total`).
    pub io_write: Source,
    /// System-call level I/O (`io_syscall_*`).
    pub io_syscall: Source,
    pub gpu: Source,
    pub model: Source,
    pub host: Source,
    /// Process counts (`processes_forked_total`, `execs_total`, `processes_exited_total`).
    pub processes: Source,
    /// Figures left out (`null`) on this host, by the name above, with the reason, e.g.
    /// `"io_write": "unavailable: no task_struct.ioac.write_bytes (…)"`. Empty when every
    /// figure is measured.
    pub missing: BTreeMap<String, String>,
    /// Each eBPF program: `attached`, or `unavailable: <why>`. Empty without BPF.
    pub programs: BTreeMap<String, String>,
    pub probes: ProbeHealth,
    /// Subscribers of `GET /v1/heartbeats/stream` when the heartbeat was made.
    pub stream_subscribers: u32,
    /// What the monitor itself cost over the interval.
    #[serde(rename = "self")]
    pub self_cost: SelfCost,
    /// `run --record`: heartbeats recorded so far, and those that could not be (full or
    /// read-only disk); `null` when not recording.
    pub record: Option<RecordHealth>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RecordHealth {
    pub written: u64,
    pub failed: u64,
}

/// The daemon's own cost over the interval.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct SelfCost {
    /// CPU seconds the daemon used, user and system.
    pub cpu_s: f64,
    /// Of those, seconds in the kernel reading the task iterator: the probes' cost per
    /// interval, which does not grow with how busy the host is.
    pub kernel_s: f64,
    /// Resident memory, bytes.
    pub rss_bytes: u64,
}

/// Events the probes could not account, cumulative since start; non-zero means some
/// figure is incomplete.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct ProbeHealth {
    pub workers_map_full: u64,
    pub read_errors: u64,
    pub nested_too_deep: u64,
    /// Task events the ring buffer had no room for (the process counts stay exact; the
    /// counters an exiting task carried are lost).
    pub events_lost: u64,
}

/// The JSON Schema of the heartbeat, generated from these types; `schema/heartbeat.schema.json`
/// holds a copy that a test keeps equal to this.
pub fn schema() -> schemars::Schema {
    schemars::schema_for!(Heartbeat)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_committed_schema_matches_the_types() {
        let committed: serde_json::Value =
            serde_json::from_str(include_str!("../../schema/heartbeat.schema.json")).expect("valid JSON");
        assert!(
            committed == *super::schema().as_value(),
            "schema/heartbeat.schema.json is stale: regenerate it with `hive-monitor schema > schema/heartbeat.schema.json`"
        );
    }
}
