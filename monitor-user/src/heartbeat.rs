//! The wire model: the reference `HiveHeartbeat` shape (every reference field name) plus
//! additive extensions. Figures not collected are `null`, never a made-up 0.
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;

pub use crate::sampler::Source;
use crate::{
    sampler::{FigureSources, Prewarm, Sample, StallFigures, WorkerSample},
    sources::memory::{MemoryReading, Origin},
    sources::nvml::DeviceReading,
};

const MIB: f64 = (1u64 << 20) as f64;
const GIB: f64 = (1u64 << 30) as f64;

pub const SCHEMA_VERSION: u32 = 1;

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

impl From<&DeviceReading> for DeviceVitals {
    fn from(d: &DeviceReading) -> Self {
        DeviceVitals {
            device_index: d.index,
            vram_used_gb: d.memory_used.map(|b| round(b as f64 / GIB, 3)),
            vram_total_gb: d.memory_total.map(|b| round(b as f64 / GIB, 3)),
            vram_utilization_percent: d
                .memory_used
                .zip(d.memory_total)
                .filter(|(_, t)| *t > 0)
                .map(|(u, t)| round(u as f64 * 100.0 / t as f64, 2)),
            name: d.name.clone(),
            uuid: d.uuid.clone(),
            gpu_utilization_percent: d.utilization_pct.map(f64::from),
            temperature_c: d.temperature_c,
            vram_used_bytes: d.memory_used,
            vram_total_bytes: d.memory_total,
        }
    }
}

impl From<&Prewarm> for PrewarmSignal {
    fn from(p: &Prewarm) -> Self {
        let util = p.device.utilization_pct.map_or(0.0, f64::from);
        PrewarmSignal {
            device_index: p.device.index,
            uuid: p.device.uuid.clone(),
            gpu_utilization_percent: util,
            temperature_c: p.device.temperature_c,
            reason: format!("GPU {} utilisation {util}% above {}%", p.device.index, p.threshold_pct),
        }
    }
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
    pub group: String,
    pub instance: String,
    pub cpu_pct: Option<f64>,
    /// Memory charged to the worker's memory cgroup (or its processes' summed RSS when that
    /// cgroup is shared; see `memory.source`), MiB.
    pub rss_mb: Option<u64>,
    pub gpu_util_pct: Option<f64>,
    pub vram_mb: Option<u64>,
    pub model: Option<String>,
    pub uptime_s: Option<u64>,
    pub io_r_mb_s: Option<f64>,
    pub io_w_mb_s: Option<f64>,
    // Extensions.
    /// The worker's cgroup path below the cgroup2 root.
    pub cgroup: String,
    pub cgroup_id: u64,
    pub processes: usize,
    pub cpu_ns_total: u64,
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
    /// Percent of the interval stalled (0 to 100), from the growth of `total`; `null` for
    /// a worker's first heartbeat.
    pub some_pct: Option<f64>,
    pub full_pct: Option<f64>,
}

impl From<&StallFigures> for PressureStall {
    fn from(s: &StallFigures) -> Self {
        PressureStall {
            some_ns_total: s.some_ns,
            full_ns_total: s.full_ns,
            some_pct: s.some_pct.map(|v| round(v, 2)),
            full_pct: s.full_pct.map(|v| round(v, 2)),
        }
    }
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
    /// `cgroup` (its memory cgroup's files) or `procfs` (summed over its processes, because
    /// its memory cgroup holds others too).
    pub source: Source,
    pub current_bytes: u64,
    pub anon_bytes: Option<u64>,
    pub file_bytes: Option<u64>,
    pub peak_bytes: Option<u64>,
    /// `null`: no limit, or not known.
    pub limit_bytes: Option<u64>,
    pub oom_kills: Option<u64>,
}

impl From<&MemoryReading> for WorkerMemory {
    fn from(m: &MemoryReading) -> Self {
        WorkerMemory {
            source: match m.origin {
                Origin::CgroupV2 | Origin::CgroupV1 => Source::Cgroup,
                Origin::Procfs => Source::Procfs,
            },
            current_bytes: m.current,
            anon_bytes: m.anon,
            file_bytes: m.file,
            peak_bytes: m.peak,
            limit_bytes: m.limit,
            oom_kills: m.oom_kills,
        }
    }
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

/// What the daemon says about itself in every heartbeat.
#[derive(Clone, Debug)]
pub struct HiveIdentity {
    pub id: String,
    pub hostname: String,
    pub port: u16,
}

impl Heartbeat {
    pub fn new(sample: &Sample, identity: &HiveIdentity, uptime_seconds: u64) -> Self {
        let s = &sample.sources;
        Heartbeat {
            schema_version: SCHEMA_VERSION,
            seq: sample.seq,
            interval_ms: round(sample.interval_ns as f64 / 1e6, 3),
            hive: Hive {
                id: identity.id.clone(),
                hostname: identity.hostname.clone(),
                port: identity.port,
                operational_status: "ready".into(),
                health_status: "healthy".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                cpu_usage_percent: sample.host.cpu_pct.map(|v| round(v, 2)),
                ram_used_gb: sample
                    .host
                    .ram_total
                    .zip(sample.host.ram_available)
                    .map(|(t, a)| round(t.saturating_sub(a) as f64 / GIB, 3)),
                ram_total_gb: sample.host.ram_total.map(|t| round(t as f64 / GIB, 3)),
                vram_per_device: sample.gpus.as_ref().map(|d| d.iter().map(DeviceVitals::from).collect()),
                uptime_seconds,
                model_dir_disk: sample.host.model_dir_disk.map(|(used, total)| DiskUsage {
                    used_gb: round(used as f64 / GIB, 3),
                    total_gb: round(total as f64 / GIB, 3),
                }),
            },
            timestamp: humantime::format_rfc3339_seconds(sample.wall).to_string(),
            workers: sample.workers.iter().map(|w| Worker::new(w, &sample.sources)).collect(),
            prewarm: sample.prewarm.iter().map(PrewarmSignal::from).collect(),
            collector: Collector {
                cpu: s.cpu,
                runq: s.runq,
                ctx_switches: s.ctx_switches,
                memory: Source::Cgroup,
                io_read: s.io_read,
                io_write: s.io_write,
                io_syscall: s.io_syscall,
                gpu: sample.gpu,
                model: Source::Procfs,
                host: Source::Procfs,
                processes: [s.processes_forked, s.execs, s.processes_exited]
                    .into_iter()
                    .find(|s| *s != Source::Ebpf)
                    .unwrap_or(Source::Ebpf),
                missing: sample
                    .missing
                    .iter()
                    .filter(|(f, _)| is_null(s, f))
                    .map(|(f, why)| (f.to_string(), why.clone()))
                    .collect(),
                programs: sample.programs.iter().map(|(p, st)| (p.to_string(), st.clone())).collect(),
                self_cost: SelfCost {
                    cpu_s: round(sample.self_cost.cpu_s, 6),
                    kernel_s: round(sample.self_cost.kernel_s, 6),
                    rss_bytes: sample.self_cost.rss_bytes,
                },
                stream_subscribers: 0,
                probes: ProbeHealth {
                    workers_map_full: sample.probe_stats.workers_full,
                    read_errors: sample.probe_stats.read_errors,
                    nested_too_deep: sample.probe_stats.too_deep,
                    events_lost: sample.probe_stats.events_lost,
                },
                record: None,
            },
        }
    }
}

/// Whether the figure the probes do not measure here has no fallback either.
fn is_null(s: &FigureSources, figure: &str) -> bool {
    let source = match figure {
        "cpu" => s.cpu,
        "io_syscall" => s.io_syscall,
        "io_read" => s.io_read,
        "io_write" => s.io_write,
        _ => Source::Unavailable,
    };
    source == Source::Unavailable
}

impl Worker {
    fn new(w: &WorkerSample, s: &FigureSources) -> Self {
        let known = |source: Source| source != Source::Unavailable;
        let figure = |source: Source, v: u64| known(source).then_some(v);
        // I/O may come from a fallback (`/proc/<pid>/io`), which may fail for a worker.
        let io = |source: Source, v: u64| (known(source) && w.io_known).then_some(v);
        let mb_s = |source: Source, v: Option<f64>| {
            v.filter(|_| known(source) && w.io_known).map(|v| round(v / 1e6, 3))
        };
        let processes = |source: Source, v: u64| (known(source) && w.processes_known).then_some(v);
        Worker {
            pid: w.pid,
            group: w.cgroup.group.clone(),
            instance: w.cgroup.instance.clone(),
            cpu_pct: w.cpu_pct.map(|v| round(v, 2)),
            rss_mb: w.memory.map(|m| (m.current as f64 / MIB).round() as u64),
            gpu_util_pct: w.gpu.as_ref().and_then(|g| g.sm_util_pct).map(|v| round(v, 2)),
            vram_mb: w.gpu.as_ref().and_then(|g| g.vram_bytes).map(|b| (b as f64 / MIB).round() as u64),
            model: w.model.clone(),
            uptime_s: w.uptime_s,
            io_r_mb_s: mb_s(s.io_read, w.storage_read_bytes_s),
            io_w_mb_s: mb_s(s.io_write, w.storage_write_bytes_s),
            cgroup: w.cgroup.path.clone(),
            cgroup_id: w.cgroup.id,
            processes: w.processes,
            cpu_ns_total: w.counters.cpu_ns,
            runq_wait_pct: w.runq_wait_pct.filter(|_| known(s.runq)).map(|v| round(v, 2)),
            runq_wait_ns_total: figure(s.runq, w.counters.runq_wait_ns),
            runq_waits_total: figure(s.runq, w.counters.runq_waits),
            ctx_switches_voluntary_total: figure(s.ctx_switches, w.counters.voluntary_switches),
            ctx_switches_involuntary_total: figure(s.ctx_switches, w.counters.involuntary_switches),
            io_syscall_r_mb_s: mb_s(s.io_syscall, w.syscall_read_bytes_s),
            io_syscall_w_mb_s: mb_s(s.io_syscall, w.syscall_write_bytes_s),
            io_syscall_read_bytes_total: io(s.io_syscall, w.counters.syscall_read_bytes),
            io_syscall_write_bytes_total: io(s.io_syscall, w.counters.syscall_write_bytes),
            io_read_bytes_total: io(s.io_read, w.counters.storage_read_bytes),
            io_write_bytes_total: io(s.io_write, w.counters.storage_write_bytes),
            processes_forked_total: processes(s.processes_forked, w.counters.processes_forked),
            execs_total: processes(s.execs, w.counters.execs),
            processes_exited_total: processes(s.processes_exited, w.counters.processes_exited),
            memory: w.memory.as_ref().map(WorkerMemory::from),
            gpus: w.gpu.as_ref().map(|g| {
                g.devices
                    .iter()
                    .map(|&(device_index, vram_bytes, sm)| WorkerGpuDevice {
                        device_index,
                        vram_bytes,
                        sm_util_pct: sm.map(|v| round(v, 2)),
                    })
                    .collect()
            }),
            pressure: {
                let [cpu, memory, io] = w.pressure.map(|p| p.as_ref().map(PressureStall::from));
                WorkerPressure { cpu, memory, io }
            },
        }
    }
}

/// The JSON Schema of the heartbeat, generated from these types; `schema/heartbeat.schema.json`
/// holds a copy that a test keeps equal to this.
pub fn schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(Heartbeat)).expect("a schema is JSON")
}

fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_committed_schema_matches_the_types() {
        let committed: serde_json::Value =
            serde_json::from_str(include_str!("../../schema/heartbeat.schema.json")).expect("valid JSON");
        assert!(
            committed == super::schema(),
            "schema/heartbeat.schema.json is stale: regenerate it with `hive-monitor schema > schema/heartbeat.schema.json`"
        );
    }
}
