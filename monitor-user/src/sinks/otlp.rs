//! Each heartbeat's figures as OTLP metrics (HTTP/protobuf) to `{endpoint}/v1/metrics`, from
//! a thread of its own, so a collector that is down or slow never holds up sampling. One
//! heartbeat waits at most: a newer one replaces it, so memory stays bounded.
//!
//! The instruments are observable: their callbacks read the heartbeat being exported, and
//! the thread triggers each export with `force_flush`, so every export is exactly one
//! heartbeat's figures. A `null` figure is not observed, so it has no data point.
use std::{
    sync::{Arc, Condvar, Mutex},
    thread::JoinHandle,
    time::Duration,
};

use opentelemetry::{
    metrics::{AsyncInstrument, Meter, MeterProvider as _},
    KeyValue,
};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::{
    metrics::{PeriodicReader, SdkMeterProvider},
    Resource,
};

use crate::{
    error::{Error, Result},
    heartbeat::{Heartbeat, PressureStall, Worker},
};

/// The reader's own timer would export a heartbeat twice; exports are triggered per
/// heartbeat instead, so its interval is only a backstop far beyond any heartbeat interval.
const READER_INTERVAL: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Default)]
struct Slot {
    pending: Option<Arc<Heartbeat>>,
    closing: bool,
}

/// The heartbeat the instruments' callbacks read; `None` outside an export.
type Current = Arc<Mutex<Option<Arc<Heartbeat>>>>;

pub struct Otlp {
    shared: Arc<(Mutex<Slot>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Otlp {
    /// Starts the exporter for `base` (e.g. `http://collector:4318`), with a timeout on every
    /// request. A malformed URL is an error here, not at the first export.
    pub fn start(base: &str, host_name: &str, timeout: Duration) -> Result<Self> {
        let url = format!("{}/v1/metrics", base.trim_end_matches('/'));
        let err = |reason: String| Error::Otlp { url: url.clone(), reason };
        let parsed = reqwest::Url::parse(&url).map_err(|e| err(e.to_string()))?;
        // The HTTP client is built without TLS; an https:// URL would fail at every export.
        if parsed.scheme() != "http" || parsed.host().is_none() {
            return Err(err("only http:// URLs with a host are supported".into()));
        }
        let current = Current::default();
        let host_name = host_name.to_string();
        let shared = Arc::new((Mutex::new(Slot::default()), Condvar::new()));
        let thread = {
            let shared = Arc::clone(&shared);
            // The SDK starts a reader thread of its own: made from this one, which holds no
            // capability by then.
            crate::privilege::spawn_unprivileged("otlp", move || {
                let provider = match provider(&url, &host_name, timeout, &current) {
                    Ok(p) => p,
                    Err(e) => return log::error!("OTLP export to {url} not started: {e}"),
                };
                deliver(&shared, &provider, &current, &url);
                // Nothing is observed now, so shutting down sends no stale figures.
                let _ = provider.shutdown();
            })
            .map_err(|e| Error::io("otlp thread", e))?
        };
        Ok(Self { shared, thread: Some(thread) })
    }

    /// Hands over a heartbeat; returns at once. A heartbeat still waiting is dropped.
    pub fn send(&self, heartbeat: &Arc<Heartbeat>) {
        let (lock, cv) = &*self.shared;
        let mut slot = lock.lock().unwrap_or_else(|e| e.into_inner());
        if slot.pending.replace(Arc::clone(heartbeat)).is_some() {
            log::debug!("otlp collector behind: an unsent heartbeat was replaced by seq {}", heartbeat.seq);
        }
        cv.notify_one();
    }
}

impl Drop for Otlp {
    fn drop(&mut self) {
        self.shared.0.lock().unwrap_or_else(|e| e.into_inner()).closing = true;
        self.shared.1.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn provider(
    url: &str,
    host_name: &str,
    timeout: Duration,
    current: &Current,
) -> std::result::Result<SdkMeterProvider, String> {
    let exporter = opentelemetry_otlp::MetricExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(url)
        .with_timeout(timeout)
        .build()
        .map_err(|e| e.to_string())?;
    let resource = Resource::builder_empty()
        .with_service_name("hive-monitor")
        .with_attributes([
            KeyValue::new("host.name", host_name.to_owned()),
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        ])
        .build();
    let provider = SdkMeterProvider::builder()
        .with_resource(resource)
        .with_reader(PeriodicReader::builder(exporter).with_interval(READER_INTERVAL).build())
        .build();
    register(&provider.meter("hive-monitor"), current);
    Ok(provider)
}

/// The sender thread: exports the newest heartbeat; a failed export is not retried, the next
/// heartbeat carries newer figures.
fn deliver(shared: &(Mutex<Slot>, Condvar), provider: &SdkMeterProvider, current: &Current, url: &str) {
    let (lock, cv) = shared;
    let mut failures = 0u32;
    loop {
        let heartbeat = {
            let mut slot = lock.lock().unwrap_or_else(|e| e.into_inner());
            while slot.pending.is_none() && !slot.closing {
                slot = cv.wait(slot).unwrap_or_else(|e| e.into_inner());
            }
            // Closing, the last heartbeat still goes out (bounded by the timeout).
            match slot.pending.take() {
                Some(h) => Some(h),
                None => return,
            }
        };
        *current.lock().unwrap_or_else(|e| e.into_inner()) = heartbeat;
        let result = provider.force_flush();
        *current.lock().unwrap_or_else(|e| e.into_inner()) = None;
        match result {
            Ok(()) => {
                if failures > 0 {
                    log::info!("otlp collector {url} reachable again after {failures} failed exports");
                }
                failures = 0;
            }
            Err(e) => {
                failures += 1;
                // Loud on the first failure, then once per 30.
                if failures == 1 || failures.is_multiple_of(30) {
                    log::warn!(
                        "otlp collector {url}: {e} (export {failures} failed; the next heartbeat is tried)"
                    );
                }
            }
        }
    }
}

/// A worker figure's data points: `put(value, attributes beyond the worker's)` for each one
/// that is not null.
type WorkerPoints<T> = fn(&Worker, &mut dyn FnMut(T, &[KeyValue]));

/// The callback of a worker instrument: every worker's points in the heartbeat being exported,
/// each with the worker's attributes first.
fn each_worker<T: 'static>(
    current: &Current,
    points: WorkerPoints<T>,
) -> impl Fn(&dyn AsyncInstrument<T>) + Send + Sync + 'static {
    let c = Arc::clone(current);
    move |o| {
        with_current(&c, |h| {
            for w in &h.workers {
                let worker = [
                    KeyValue::new("rbee.worker.group", w.group.clone()),
                    KeyValue::new("rbee.worker.instance", w.instance.clone()),
                ];
                points(w, &mut |v, extra| {
                    let attributes: Vec<KeyValue> = worker.iter().chain(extra).cloned().collect();
                    o.observe(v, &attributes)
                })
            }
        })
    }
}

/// Calls `f` with the heartbeat being exported, if any.
fn with_current(current: &Current, f: impl FnOnce(&Heartbeat)) {
    if let Some(h) = current.lock().unwrap_or_else(|e| e.into_inner()).as_deref() {
        f(h)
    }
}

fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// `(attribute value, figure)` pairs as points with `key`, skipping the null ones.
fn put_each<T>(
    put: &mut dyn FnMut(T, &[KeyValue]),
    key: &'static str,
    figures: impl IntoIterator<Item = (&'static str, Option<T>)>,
) {
    for (value, figure) in figures {
        if let Some(v) = figure {
            put(v, &[KeyValue::new(key, value)])
        }
    }
}

/// The instruments; README "OpenTelemetry (OTLP)" lists them.
fn register(meter: &Meter, current: &Current) {
    register_hive(meter, current);
    register_worker_cpu(meter, current);
    register_worker_io_memory(meter, current);
    register_worker_pressure_gpu(meter, current);
}

fn register_hive(meter: &Meter, current: &Current) {
    let c = Arc::clone(current);
    meter
        .u64_observable_gauge("rbee.hive.heartbeat.seq")
        .with_description("Sequence number of the heartbeat these figures are from")
        .with_unit("{heartbeat}")
        .with_callback(move |o| with_current(&c, |h| o.observe(h.seq, &[])))
        .build();
    let c = Arc::clone(current);
    meter
        .f64_observable_gauge("system.cpu.utilization")
        .with_description("Host CPU busy, share of all CPUs")
        .with_unit("1")
        .with_callback(move |o| {
            with_current(&c, |h| {
                if let Some(p) = h.hive.cpu_usage_percent {
                    o.observe(p / 100.0, &[])
                }
            })
        })
        .build();
    let c = Arc::clone(current);
    meter
        .f64_observable_gauge("rbee.monitor.cpu.usage")
        .with_description("CPUs the monitor itself used over the interval")
        .with_unit("{cpu}")
        .with_callback(move |o| {
            with_current(&c, |h| {
                if h.interval_ms > 0.0 {
                    o.observe(h.collector.self_cost.cpu_s * 1000.0 / h.interval_ms, &[])
                }
            })
        })
        .build();
    let c = Arc::clone(current);
    meter
        .u64_observable_gauge("rbee.monitor.memory.usage")
        .with_description("Resident memory of the monitor itself")
        .with_unit("By")
        .with_callback(move |o| with_current(&c, |h| o.observe(h.collector.self_cost.rss_bytes, &[])))
        .build();
    let c = Arc::clone(current);
    meter
        .u64_observable_counter("rbee.monitor.probe.losses")
        .with_description(
            "Events the probes could not account, cumulative; non-zero means a figure is incomplete",
        )
        .with_unit("{event}")
        .with_callback(move |o| {
            with_current(&c, |h| {
                let p = &h.collector.probes;
                for (reason, n) in [
                    ("workers_map_full", p.workers_map_full),
                    ("read_errors", p.read_errors),
                    ("nested_too_deep", p.nested_too_deep),
                    ("events_lost", p.events_lost),
                ] {
                    o.observe(n, &[KeyValue::new("rbee.loss.reason", reason)])
                }
            })
        })
        .build();
    type DeviceFigure = fn(&crate::heartbeat::DeviceVitals) -> Option<f64>;
    let devices: [(&'static str, &'static str, &'static str, DeviceFigure); 3] = [
        ("hw.gpu.utilization", "GPU utilisation", "1", |d| d.gpu_utilization_percent.map(|p| p / 100.0)),
        ("hw.gpu.memory.usage", "GPU memory used", "By", |d| d.vram_used_bytes.map(|b| b as f64)),
        ("hw.gpu.memory.limit", "GPU memory size", "By", |d| d.vram_total_bytes.map(|b| b as f64)),
    ];
    for (name, description, unit, figure) in devices {
        let c = Arc::clone(current);
        meter
            .f64_observable_gauge(name)
            .with_description(description)
            .with_unit(unit)
            .with_callback(move |o| {
                with_current(&c, |h| {
                    for d in h.hive.vram_per_device.iter().flatten() {
                        if let Some(v) = figure(d) {
                            let id = d.uuid.clone().unwrap_or_else(|| d.device_index.to_string());
                            o.observe(
                                v,
                                &[
                                    KeyValue::new("hw.id", id),
                                    KeyValue::new("rbee.gpu.index", i64::from(d.device_index)),
                                ],
                            )
                        }
                    }
                })
            })
            .build();
    }
}

fn register_worker_cpu(meter: &Meter, current: &Current) {
    meter
        .f64_observable_counter("container.cpu.time")
        .with_description("CPU time of the worker's cgroup, cumulative")
        .with_unit("s")
        .with_callback(each_worker(current, |w, put| {
            if let Some(ns) = w.cpu_ns_total {
                put(seconds(ns), &[]);
            }
        }))
        .build();
    meter
        .f64_observable_gauge("container.cpu.usage")
        .with_description("CPUs the worker used over the interval (1 = one CPU busy)")
        .with_unit("{cpu}")
        .with_callback(each_worker(current, |w, put| {
            if let Some(p) = w.cpu_pct {
                put(p / 100.0, &[])
            }
        }))
        .build();
    meter
        .f64_observable_counter("rbee.worker.cpu.runq_wait.time")
        .with_description("Time the worker's tasks were runnable but not running, cumulative")
        .with_unit("s")
        .with_callback(each_worker(current, |w, put| {
            if let Some(ns) = w.runq_wait_ns_total {
                put(seconds(ns), &[])
            }
        }))
        .build();
    meter
        .f64_observable_gauge("rbee.worker.cpu.runq_wait.usage")
        .with_description("Tasks of the worker waiting to run, on average over the interval")
        .with_unit("{task}")
        .with_callback(each_worker(current, |w, put| {
            if let Some(p) = w.runq_wait_pct {
                put(p / 100.0, &[])
            }
        }))
        .build();
    meter
        .u64_observable_counter("rbee.worker.cpu.runq_waits")
        .with_description("Times the worker's tasks waited to run, cumulative")
        .with_unit("{wait}")
        .with_callback(each_worker(current, |w, put| {
            if let Some(n) = w.runq_waits_total {
                put(n, &[])
            }
        }))
        .build();
    meter
        .u64_observable_counter("rbee.worker.context_switches")
        .with_description("Context switches of the worker's tasks, cumulative")
        .with_unit("{switch}")
        .with_callback(each_worker(current, |w, put| {
            put_each(
                put,
                "process.context_switch.type",
                [
                    ("voluntary", w.ctx_switches_voluntary_total),
                    ("involuntary", w.ctx_switches_involuntary_total),
                ],
            )
        }))
        .build();
    meter
        .u64_observable_gauge("rbee.worker.processes")
        .with_description("Processes in the worker's cgroup")
        .with_unit("{process}")
        .with_callback(each_worker(current, |w, put| put(w.processes as u64, &[])))
        .build();
    meter
        .u64_observable_counter("rbee.worker.process.events")
        .with_description(
            "Processes the worker's tasks forked, programs they exec'd, processes that ended, cumulative",
        )
        .with_unit("{event}")
        .with_callback(each_worker(current, |w, put| {
            put_each(
                put,
                "rbee.process.event",
                [
                    ("fork", w.processes_forked_total),
                    ("exec", w.execs_total),
                    ("exit", w.processes_exited_total),
                ],
            )
        }))
        .build();
}

fn register_worker_io_memory(meter: &Meter, current: &Current) {
    meter
        .u64_observable_counter("container.disk.io")
        .with_description("Storage-level bytes the worker read and wrote, cumulative")
        .with_unit("By")
        .with_callback(each_worker(current, |w, put| {
            put_each(
                put,
                "disk.io.direction",
                [("read", w.io_read_bytes_total), ("write", w.io_write_bytes_total)],
            )
        }))
        .build();
    meter
        .u64_observable_counter("rbee.worker.io.syscall")
        .with_description("Bytes the worker's read- and write-type system calls moved, cumulative")
        .with_unit("By")
        .with_callback(each_worker(current, |w, put| {
            put_each(
                put,
                "rbee.io.direction",
                [("read", w.io_syscall_read_bytes_total), ("write", w.io_syscall_write_bytes_total)],
            )
        }))
        .build();
    meter
        .u64_observable_gauge("container.memory.usage")
        .with_description("Memory charged to the worker")
        .with_unit("By")
        .with_callback(each_worker(current, |w, put| {
            if let Some(m) = &w.memory {
                put(m.current_bytes, &[])
            }
        }))
        .build();
    meter
        .u64_observable_gauge("rbee.worker.memory.usage")
        .with_description("Memory charged to the worker, by type")
        .with_unit("By")
        .with_callback(each_worker(current, |w, put| {
            if let Some(m) = &w.memory {
                put_each(put, "rbee.memory.type", [("anon", m.anon_bytes), ("file", m.file_bytes)])
            }
        }))
        .build();
    meter
        .u64_observable_gauge("rbee.worker.memory.peak")
        .with_description("Most memory charged to the worker at once")
        .with_unit("By")
        .with_callback(each_worker(current, |w, put| {
            if let Some(b) = w.memory.as_ref().and_then(|m| m.peak_bytes) {
                put(b, &[])
            }
        }))
        .build();
    meter
        .u64_observable_gauge("rbee.worker.memory.limit")
        .with_description("The worker's memory limit")
        .with_unit("By")
        .with_callback(each_worker(current, |w, put| {
            if let Some(b) = w.memory.as_ref().and_then(|m| m.limit_bytes) {
                put(b, &[])
            }
        }))
        .build();
    meter
        .u64_observable_counter("rbee.worker.memory.oom_kills")
        .with_description("Processes of the worker the OOM killer ended, cumulative")
        .with_unit("{process}")
        .with_callback(each_worker(current, |w, put| {
            if let Some(n) = w.memory.as_ref().and_then(|m| m.oom_kills) {
                put(n, &[])
            }
        }))
        .build();
}

/// Each `(resource, scope, figure)` of a worker's pressure that is not null.
fn stalls<T>(w: &Worker, figure: fn(&PressureStall) -> [Option<T>; 2], put: &mut dyn FnMut(T, &[KeyValue])) {
    let p = &w.pressure;
    for (resource, stall) in [("cpu", &p.cpu), ("memory", &p.memory), ("io", &p.io)] {
        let Some(stall) = stall else { continue };
        for (scope, v) in ["some", "full"].into_iter().zip(figure(stall)) {
            if let Some(v) = v {
                put(
                    v,
                    &[
                        KeyValue::new("rbee.pressure.resource", resource),
                        KeyValue::new("rbee.pressure.scope", scope),
                    ],
                )
            }
        }
    }
}

fn register_worker_pressure_gpu(meter: &Meter, current: &Current) {
    meter
        .f64_observable_counter("rbee.worker.pressure.stall.time")
        .with_description("Time the worker's tasks were stalled on a resource (some: at least one; full: all at once), cumulative")
        .with_unit("s")
        .with_callback(each_worker(current, |w, put| {
            stalls(w, |s| [s.some_ns_total.map(seconds), s.full_ns_total.map(seconds)], put)
        }))
        .build();
    meter
        .f64_observable_gauge("rbee.worker.pressure.stall.utilization")
        .with_description("Share of the interval the worker's tasks were stalled on a resource")
        .with_unit("1")
        .with_callback(each_worker(current, |w, put| {
            stalls(w, |s| [s.some_pct.map(|p| p / 100.0), s.full_pct.map(|p| p / 100.0)], put)
        }))
        .build();
    meter
        .f64_observable_gauge("rbee.worker.gpu.utilization")
        .with_description("Mean SM utilisation of the worker's processes on a GPU over the interval")
        .with_unit("1")
        .with_callback(each_worker(current, |w, put| {
            for d in w.gpus.iter().flatten() {
                if let Some(p) = d.sm_util_pct {
                    put(p / 100.0, &[KeyValue::new("rbee.gpu.index", i64::from(d.device_index))])
                }
            }
        }))
        .build();
    meter
        .u64_observable_gauge("rbee.worker.gpu.memory.usage")
        .with_description("GPU memory the worker's processes use on a GPU")
        .with_unit("By")
        .with_callback(each_worker(current, |w, put| {
            for d in w.gpus.iter().flatten() {
                if let Some(b) = d.vram_bytes {
                    put(b, &[KeyValue::new("rbee.gpu.index", i64::from(d.device_index))])
                }
            }
        }))
        .build();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_endpoints_are_errors_at_start() {
        for url in
            ["collector:4318", "ftp://collector", "https://collector", "http://bad host", "not a url", ""]
        {
            let e = Otlp::start(url, "h", Duration::from_secs(1)).err().expect(url).to_string();
            assert!(e.starts_with("otlp endpoint "), "{url:?}: {e}");
        }
    }
}
