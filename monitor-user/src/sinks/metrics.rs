//! A heartbeat as Prometheus metrics, by Prometheus's conventions: base units (seconds,
//! bytes, ratios of 1), HELP and TYPE on every family, cumulative figures as counters, no
//! series for a figure that is `null`, and no label Prometheus attaches itself (`instance`,
//! `job`): a worker is `group` and `worker`. Metadata that changes rarely (model, cgroup) is
//! on `hive_worker_info`, so a model name read late does not start new series.
//!
//! prometheus-client encodes OpenMetrics text, which Prometheus asks for. A client that
//! does not ask for it (curl, promtool) gets the classic text format (0.0.4), converted from
//! that: there a counter family is named with its `_total`, and `# UNIT`/`# EOF` are not
//! part of the format.
use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};

use crate::heartbeat::{Heartbeat, PressureStall};

type F64Gauge = Gauge<f64, AtomicU64>;
type F64Counter = Counter<f64, AtomicU64>;
type Labels = Vec<(&'static str, String)>;

pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const TEXT_0_0_4: &str = "text/plain; version=0.0.4; charset=utf-8";

const GIB: f64 = (1u64 << 30) as f64;
const MIB: f64 = (1u64 << 20) as f64;

/// What the daemon itself used since it started, summed over the heartbeats published.
#[derive(Clone, Copy, Debug, Default)]
pub struct SelfTotals {
    pub cpu_s: f64,
    pub kernel_s: f64,
}

#[derive(Clone, Copy)]
enum Kind {
    Gauge,
    Counter,
}

/// Collects the samples of one family, registered only when it has any.
struct Fam {
    name: &'static str,
    help: &'static str,
    unit: Option<Unit>,
    kind: Kind,
    samples: Vec<(Labels, f64)>,
}

fn fam(name: &'static str, help: &'static str, unit: Option<Unit>, kind: Kind) -> Fam {
    Fam { name, help, unit, kind, samples: Vec::new() }
}

impl Fam {
    fn add(&mut self, labels: Labels, v: Option<f64>) {
        if let Some(v) = v.filter(|v| v.is_finite()) {
            self.samples.push((labels, v));
        }
    }

    fn register(self, r: &mut Registry) {
        if self.samples.is_empty() {
            return;
        }
        // A family of one series without labels is a plain metric (no `{}` after its name).
        if let [(labels, v)] = self.samples.as_slice() {
            if labels.is_empty() {
                match self.kind {
                    Kind::Gauge => {
                        let g = F64Gauge::default();
                        g.set(*v);
                        register(r, self.name, self.help, self.unit, g);
                    }
                    Kind::Counter => {
                        let c = F64Counter::default();
                        c.inc_by(v.max(0.0));
                        register(r, self.name, self.help, self.unit, c);
                    }
                }
                return;
            }
        }
        match self.kind {
            Kind::Gauge => {
                let f = Family::<Labels, F64Gauge>::default();
                for (l, v) in &self.samples {
                    f.get_or_create(l).set(*v);
                }
                register(r, self.name, self.help, self.unit, f);
            }
            Kind::Counter => {
                let f = Family::<Labels, F64Counter>::default();
                for (l, v) in &self.samples {
                    f.get_or_create(l).inc_by(v.max(0.0));
                }
                register(r, self.name, self.help, self.unit, f);
            }
        }
    }
}

fn register(
    r: &mut Registry,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    metric: impl prometheus_client::registry::Metric,
) {
    match unit {
        Some(unit) => r.register_with_unit(name, help, unit, metric),
        None => r.register(name, help, metric),
    }
}

fn ratio() -> Option<Unit> {
    Some(Unit::Other("ratio".into()))
}

fn pct(v: Option<f64>) -> Option<f64> {
    v.map(|v| v / 100.0)
}

fn n<T: Into<f64>>(v: Option<T>) -> Option<f64> {
    v.map(Into::into)
}

fn u(v: Option<u64>) -> Option<f64> {
    v.map(|v| v as f64)
}

/// The heartbeat's figures as a registry.
#[expect(clippy::too_many_lines, reason = "one entry per exported family: a table, read top to bottom")]
pub fn registry(hb: &Heartbeat, own: SelfTotals) -> Registry {
    use Kind::{Counter as C, Gauge as G};
    let mut r = Registry::with_prefix("hive");
    let h = &hb.hive;
    let none = Labels::new;

    let mut info = fam("info", "The hive: its id, host name and version (always 1)", None, G);
    info.add(
        vec![("hive", h.id.clone()), ("hostname", h.hostname.clone()), ("version", h.version.clone())],
        Some(1.0),
    );
    let mut heartbeats = fam("heartbeats", "Heartbeats this daemon sampled since it started", None, C);
    heartbeats.add(none(), u(Some(hb.seq)));
    let mut stamp = fam("heartbeat_timestamp", "Unix time of the latest heartbeat", Some(Unit::Seconds), G);
    stamp.add(
        none(),
        humantime::parse_rfc3339(&hb.timestamp)
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs_f64()),
    );
    let mut interval =
        fam("heartbeat_interval", "Wall length of the latest interval", Some(Unit::Seconds), G);
    interval.add(none(), Some(hb.interval_ms / 1e3));
    let mut uptime = fam("uptime", "Time this daemon has been running", Some(Unit::Seconds), G);
    uptime.add(none(), u(Some(h.uptime_seconds)));
    let mut host_cpu = fam("host_cpu_usage", "Busy share of all CPUs over the latest interval", ratio(), G);
    host_cpu.add(none(), pct(h.cpu_usage_percent));
    let mut ram_used = fam("host_ram_used", "RAM in use (total minus available)", Some(Unit::Bytes), G);
    ram_used.add(none(), h.ram_used_gb.map(|g| (g * GIB).round()));
    let mut ram_total = fam("host_ram_total", "RAM installed", Some(Unit::Bytes), G);
    ram_total.add(none(), h.ram_total_gb.map(|g| (g * GIB).round()));
    let mut disk_used = fam(
        "model_dir_disk_used",
        "Used space of the file system holding the model directory",
        Some(Unit::Bytes),
        G,
    );
    let mut disk_total = fam(
        "model_dir_disk_total",
        "Size of the file system holding the model directory",
        Some(Unit::Bytes),
        G,
    );
    if let Some(d) = &h.model_dir_disk {
        disk_used.add(none(), Some((d.used_gb * GIB).round()));
        disk_total.add(none(), Some((d.total_gb * GIB).round()));
    }

    let mut gpu_util = fam("gpu_utilization", "GPU utilisation over the driver's sample period", ratio(), G);
    let mut gpu_used = fam("gpu_memory_used", "GPU memory in use", Some(Unit::Bytes), G);
    let mut gpu_total = fam("gpu_memory_total", "GPU memory installed", Some(Unit::Bytes), G);
    let mut gpu_mem_ratio =
        fam("gpu_memory_utilization", "GPU memory in use, share of installed", ratio(), G);
    let mut gpu_temp = fam("gpu_temperature", "GPU temperature", Some(Unit::Celsius), G);
    for d in h.vram_per_device.iter().flatten() {
        let l = || {
            vec![
                ("device", d.device_index.to_string()),
                ("uuid", d.uuid.clone().unwrap_or_default()),
                ("name", d.name.clone().unwrap_or_default()),
            ]
        };
        gpu_util.add(l(), pct(d.gpu_utilization_percent));
        gpu_used.add(l(), d.vram_used_gb.map(|g| (g * GIB).round()));
        gpu_total.add(l(), d.vram_total_gb.map(|g| (g * GIB).round()));
        gpu_mem_ratio.add(l(), pct(d.vram_utilization_percent));
        gpu_temp.add(l(), n(d.temperature_c));
    }

    let mut w_info = fam(
        "worker_info",
        "A worker: its model (empty until read or when none), cgroup path and id (always 1)",
        None,
        G,
    );
    let mut w_pid = fam("worker_main_pid", "The worker's oldest process", None, G);
    let mut w_uptime =
        fam("worker_uptime", "How long the worker's oldest process has run", Some(Unit::Seconds), G);
    let mut w_procs = fam("worker_processes", "Processes in the worker's cgroups", None, G);
    let mut w_cpu =
        fam("worker_cpu", "On-CPU time the kernel charged the worker's tasks", Some(Unit::Seconds), C);
    let mut w_cpu_ratio = fam(
        "worker_cpu_usage",
        "On-CPU time over the latest interval, per wall second (1 = one core)",
        ratio(),
        G,
    );
    let mut w_runq = fam(
        "worker_runq_wait",
        "Time the worker's tasks were runnable but not running",
        Some(Unit::Seconds),
        C,
    );
    let mut w_runq_ratio = fam(
        "worker_runq_wait",
        "Run-queue wait over the latest interval, per wall second (1 = one task waiting throughout)",
        ratio(),
        G,
    );
    let mut w_waits = fam("worker_runq_waits", "Times the worker's tasks got a CPU after waiting", None, C);
    let mut w_switches = fam("worker_context_switches", "Context switches of the worker's tasks", None, C);
    let mut w_io = fam(
        "worker_io",
        "Bytes the worker's tasks moved: level storage (block device reads; pages dirtied and direct writes) \
         or syscall (read- and write-type system calls)",
        Some(Unit::Bytes),
        C,
    );
    let mut w_io_rate = fam(
        "worker_io",
        "Bytes per second over the latest interval, by level and direction",
        Some(Unit::Other("bytes_per_second".into())),
        G,
    );
    let mut w_forked = fam("worker_processes_forked", "Processes the worker's tasks forked", None, C);
    let mut w_execs = fam("worker_execs", "Programs the worker's tasks executed", None, C);
    let mut w_exited = fam("worker_processes_exited", "Processes of the worker that ended", None, C);
    let mut m_current = fam(
        "worker_memory_usage",
        "Memory charged to the worker's memory cgroup (or its summed RSS)",
        Some(Unit::Bytes),
        G,
    );
    let mut m_anon = fam("worker_memory_anon", "Anonymous memory of the worker", Some(Unit::Bytes), G);
    let mut m_file = fam("worker_memory_file", "Page cache charged to the worker", Some(Unit::Bytes), G);
    let mut m_peak =
        fam("worker_memory_peak", "High-water mark of the worker's memory cgroup", Some(Unit::Bytes), G);
    let mut m_limit =
        fam("worker_memory_limit", "Memory limit of the worker's memory cgroup", Some(Unit::Bytes), G);
    let mut m_oom =
        fam("worker_oom_kills", "Processes the OOM killer ended in the worker's memory cgroup", None, C);
    let mut w_vram =
        fam("worker_gpu_memory", "VRAM of the worker's processes, all devices", Some(Unit::Bytes), G);
    let mut w_gpu = fam(
        "worker_gpu_utilization",
        "SM utilisation of the worker's processes, summed over devices",
        ratio(),
        G,
    );
    let mut wd_vram =
        fam("worker_gpu_device_memory", "VRAM of the worker's processes per device", Some(Unit::Bytes), G);
    let mut wd_util = fam(
        "worker_gpu_device_utilization",
        "SM utilisation of the worker's processes per device",
        ratio(),
        G,
    );
    let mut w_stalled = fam(
        "worker_pressure_stalled",
        "Time some (or all, kind full) of the worker's tasks were stalled on a resource (cgroup *.pressure total)",
        Some(Unit::Seconds),
        C,
    );
    let mut w_stall_ratio = fam(
        "worker_pressure_stall",
        "Share of the latest interval the worker's tasks were stalled",
        ratio(),
        G,
    );

    for w in &hb.workers {
        let l = || vec![("group", w.group.to_string()), ("worker", w.instance.to_string())];
        let with = |extra: &[(&'static str, &str)]| {
            let mut v = l();
            v.extend(extra.iter().map(|(k, x)| (*k, x.to_string())));
            v
        };
        w_info.add(
            with(&[
                ("model", w.model.as_deref().unwrap_or("")),
                ("cgroup", &w.cgroup),
                ("cgroup_id", &w.cgroup_id.to_string()),
            ]),
            Some(1.0),
        );
        w_pid.add(l(), n(w.pid));
        w_uptime.add(l(), u(w.uptime_s));
        w_procs.add(l(), Some(w.processes as f64));
        w_cpu.add(l(), w.cpu_ns_total.map(|ns| ns as f64 / 1e9));
        w_cpu_ratio.add(l(), pct(w.cpu_pct));
        w_runq.add(l(), w.runq_wait_ns_total.map(|ns| ns as f64 / 1e9));
        w_runq_ratio.add(l(), pct(w.runq_wait_pct));
        w_waits.add(l(), u(w.runq_waits_total));
        w_switches.add(with(&[("kind", "voluntary")]), u(w.ctx_switches_voluntary_total));
        w_switches.add(with(&[("kind", "involuntary")]), u(w.ctx_switches_involuntary_total));
        for (level, dir, total, mb_s) in [
            ("storage", "read", w.io_read_bytes_total, w.io_r_mb_s),
            ("storage", "write", w.io_write_bytes_total, w.io_w_mb_s),
            ("syscall", "read", w.io_syscall_read_bytes_total, w.io_syscall_r_mb_s),
            ("syscall", "write", w.io_syscall_write_bytes_total, w.io_syscall_w_mb_s),
        ] {
            w_io.add(with(&[("level", level), ("direction", dir)]), u(total));
            w_io_rate.add(with(&[("level", level), ("direction", dir)]), mb_s.map(|v| v * 1e6));
        }
        w_forked.add(l(), u(w.processes_forked_total));
        w_execs.add(l(), u(w.execs_total));
        w_exited.add(l(), u(w.processes_exited_total));
        if let Some(m) = &w.memory {
            m_current.add(l(), Some(m.current_bytes as f64));
            m_anon.add(l(), u(m.anon_bytes));
            m_file.add(l(), u(m.file_bytes));
            m_peak.add(l(), u(m.peak_bytes));
            m_limit.add(l(), u(m.limit_bytes));
            m_oom.add(l(), u(m.oom_kills));
        }
        w_vram.add(l(), w.vram_mb.map(|mb| mb as f64 * MIB));
        w_gpu.add(l(), pct(w.gpu_util_pct));
        for d in w.gpus.iter().flatten() {
            let i = d.device_index.to_string();
            wd_vram.add(with(&[("device", &i)]), u(d.vram_bytes));
            wd_util.add(with(&[("device", &i)]), pct(d.sm_util_pct));
        }
        let p = &w.pressure;
        for (resource, stall) in [("cpu", &p.cpu), ("memory", &p.memory), ("io", &p.io)] {
            let Some(PressureStall { some_ns_total, full_ns_total, some_pct, full_pct }) = stall else {
                continue;
            };
            for (kind, total, share) in [("some", some_ns_total, some_pct), ("full", full_ns_total, full_pct)]
            {
                let labels = with(&[("resource", resource), ("kind", kind)]);
                w_stalled.add(labels.clone(), total.map(|ns| ns as f64 / 1e9));
                w_stall_ratio.add(labels, pct(*share));
            }
        }
    }

    let c = &hb.collector;
    let mut lost = fam(
        "probe_lost_events",
        "Events the probes could not account (non-zero: some figure is incomplete), by reason",
        None,
        C,
    );
    for (reason, v) in [
        ("events_lost", c.probes.events_lost),
        ("workers_map_full", c.probes.workers_map_full),
        ("read_errors", c.probes.read_errors),
        ("nested_too_deep", c.probes.nested_too_deep),
    ] {
        lost.add(vec![("reason", reason.to_string())], Some(v as f64));
    }
    let mut source = fam(
        "collector_source_info",
        "Where each figure comes from (ebpf, procfs, cgroup, nvml or unavailable; always 1)",
        None,
        G,
    );
    for (figure, s) in [
        ("cpu", c.cpu),
        ("runq", c.runq),
        ("ctx_switches", c.ctx_switches),
        ("memory", c.memory),
        ("io_read", c.io_read),
        ("io_write", c.io_write),
        ("io_syscall", c.io_syscall),
        ("gpu", c.gpu),
        ("model", c.model),
        ("host", c.host),
        ("processes", c.processes),
    ] {
        let name =
            serde_json::to_value(s).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
        source.add(vec![("figure", figure.to_string()), ("source", name)], Some(1.0));
    }
    let mut self_cpu = fam("self_cpu", "CPU time this daemon used, user and system", Some(Unit::Seconds), C);
    self_cpu.add(none(), Some(own.cpu_s));
    let mut self_kernel = fam(
        "self_probe_read",
        "Of that, time in the kernel reading the task iterator (the probes' cost)",
        Some(Unit::Seconds),
        C,
    );
    self_kernel.add(none(), Some(own.kernel_s));
    let mut self_rss = fam("self_resident_memory", "Resident memory of this daemon", Some(Unit::Bytes), G);
    self_rss.add(none(), Some(c.self_cost.rss_bytes as f64));

    for f in [
        info,
        heartbeats,
        stamp,
        interval,
        uptime,
        host_cpu,
        ram_used,
        ram_total,
        disk_used,
        disk_total,
        gpu_util,
        gpu_used,
        gpu_total,
        gpu_mem_ratio,
        gpu_temp,
        w_info,
        w_pid,
        w_uptime,
        w_procs,
        w_cpu,
        w_cpu_ratio,
        w_runq,
        w_runq_ratio,
        w_waits,
        w_switches,
        w_io,
        w_io_rate,
        w_forked,
        w_execs,
        w_exited,
        m_current,
        m_anon,
        m_file,
        m_peak,
        m_limit,
        m_oom,
        w_vram,
        w_gpu,
        wd_vram,
        wd_util,
        w_stalled,
        w_stall_ratio,
        lost,
        source,
        self_cpu,
        self_kernel,
        self_rss,
    ] {
        f.register(&mut r);
    }
    r
}

/// The registry in OpenMetrics text, or in the classic text format.
pub fn encode_text(r: &Registry, openmetrics: bool) -> Result<String, std::fmt::Error> {
    let mut body = String::new();
    encode(&mut body, r)?;
    Ok(if openmetrics { body } else { to_classic(&body) })
}

/// Whether an `Accept` header asks for OpenMetrics, as Prometheus's scrapes do.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| a.split(',').any(|t| t.trim().starts_with("application/openmetrics-text")))
}

/// OpenMetrics text (as prometheus-client writes it: HELP, TYPE, UNIT, samples) to the
/// classic format: a counter family takes its samples' `_total` name, `unknown` is
/// `untyped`, and `# UNIT` and `# EOF` go.
fn to_classic(open: &str) -> String {
    let mut out = String::with_capacity(open.len());
    let mut help: Option<(&str, &str)> = None;
    for line in open.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = rest.split_once(' ').or(Some((rest, "")));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "gauge" => (name.to_string(), "gauge"),
                _ => (name.to_string(), "untyped"),
            };
            if let Some((_, text)) = help.take() {
                out += &format!("# HELP {name} {text}\n");
            }
            out += &format!("# TYPE {name} {kind}\n");
        } else if !line.starts_with('#') {
            out += line;
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_text_names_counter_families_by_their_samples() {
        let open = "# HELP hive_worker_cpu_seconds On-CPU time.\n# TYPE hive_worker_cpu_seconds counter\n\
                    # UNIT hive_worker_cpu_seconds seconds\nhive_worker_cpu_seconds_total{group=\"a\"} 1.5\n\
                    # HELP hive_uptime_seconds Up.\n# TYPE hive_uptime_seconds gauge\n\
                    # UNIT hive_uptime_seconds seconds\nhive_uptime_seconds 3.0\n# EOF\n";
        assert_eq!(
            to_classic(open),
            "# HELP hive_worker_cpu_seconds_total On-CPU time.\n# TYPE hive_worker_cpu_seconds_total counter\n\
             hive_worker_cpu_seconds_total{group=\"a\"} 1.5\n# HELP hive_uptime_seconds Up.\n\
             # TYPE hive_uptime_seconds gauge\nhive_uptime_seconds 3.0\n"
        );
    }

    #[test]
    fn openmetrics_only_when_asked() {
        assert!(wants_openmetrics(Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5")));
        assert!(!wants_openmetrics(Some("text/plain")));
        assert!(!wants_openmetrics(None));
    }
}
