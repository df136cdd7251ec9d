//! Formats a `Sample` as the wire heartbeat (`monitor_wire::heartbeat`): units, rounding and
//! names only; every figure and every null was decided by `Sample::new`.
pub use monitor_wire::heartbeat::*;

use crate::{
    sample::{FigureSources, Prewarm, Sample, StallFigures, WorkerSample},
    sources::memory::{MemoryReading, Origin},
    sources::nvml::DeviceReading,
};

const MIB: f64 = (1u64 << 20) as f64;
const GIB: f64 = (1u64 << 30) as f64;

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

impl From<&MemoryReading> for WorkerMemory {
    fn from(m: &MemoryReading) -> Self {
        WorkerMemory {
            source: match m.origin {
                Origin::CgroupV2 | Origin::CgroupV1 => Source::Cgroup,
                Origin::Ebpf => Source::Ebpf,
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

/// What the daemon says about itself in every heartbeat.
#[derive(Clone, Debug)]
pub struct HiveIdentity {
    pub id: String,
    pub hostname: String,
    pub port: u16,
}

/// The heartbeat of `sample`, from a daemon `uptime_seconds` old.
pub fn format(sample: &Sample, identity: &HiveIdentity, uptime_seconds: u64) -> Heartbeat {
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
        workers: sample.workers.iter().map(worker).collect(),
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

fn worker(w: &WorkerSample) -> Worker {
    let (t, per_s) = (&w.totals, &w.per_s);
    let mb_s = |v: Option<f64>| v.map(|v| round(v / 1e6, 3));
    Worker {
        pid: w.pid,
        group: w.cgroup.group.clone(),
        instance: w.cgroup.instance.clone(),
        cpu_pct: w.cpu_pct().map(|v| round(v, 2)),
        rss_mb: w.memory.map(|m| (m.current as f64 / MIB).round() as u64),
        gpu_util_pct: w.gpu.as_ref().and_then(|g| g.sm_util_pct).map(|v| round(v, 2)),
        vram_mb: w.gpu.as_ref().and_then(|g| g.vram_bytes).map(|b| (b as f64 / MIB).round() as u64),
        model: w.model.clone(),
        uptime_s: w.uptime_s,
        io_r_mb_s: mb_s(per_s.storage_read_bytes),
        io_w_mb_s: mb_s(per_s.storage_write_bytes),
        cgroup: w.cgroup.path.clone(),
        cgroup_id: w.cgroup.id,
        processes: w.processes,
        cpu_ns_total: t.cpu_ns,
        runq_wait_pct: w.runq_wait_pct().map(|v| round(v, 2)),
        runq_wait_ns_total: t.runq_wait_ns,
        runq_waits_total: t.runq_waits,
        ctx_switches_voluntary_total: t.voluntary_switches,
        ctx_switches_involuntary_total: t.involuntary_switches,
        io_syscall_r_mb_s: mb_s(per_s.syscall_read_bytes),
        io_syscall_w_mb_s: mb_s(per_s.syscall_write_bytes),
        io_syscall_read_bytes_total: t.syscall_read_bytes,
        io_syscall_write_bytes_total: t.syscall_write_bytes,
        io_read_bytes_total: t.storage_read_bytes,
        io_write_bytes_total: t.storage_write_bytes,
        processes_forked_total: t.processes_forked,
        execs_total: t.execs,
        processes_exited_total: t.processes_exited,
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

fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}
