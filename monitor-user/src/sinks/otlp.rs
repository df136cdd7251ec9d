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
    metrics::{Meter, MeterProvider as _},
    KeyValue,
};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::{
    metrics::{PeriodicReader, SdkMeterProvider},
    Resource,
};

use crate::{
    error::{Error, Result},
    heartbeat::{Heartbeat, Worker},
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

fn worker_attributes(w: &Worker) -> [KeyValue; 2] {
    [
        KeyValue::new("rbee.worker.group", w.group.clone()),
        KeyValue::new("rbee.worker.instance", w.instance.clone()),
    ]
}

/// Calls `f` with the heartbeat being exported, if any.
fn with_current(current: &Current, f: impl FnOnce(&Heartbeat)) {
    if let Some(h) = current.lock().unwrap_or_else(|e| e.into_inner()).as_deref() {
        f(h)
    }
}

/// The instruments; README "OpenTelemetry (OTLP)" lists them.
fn register(meter: &Meter, current: &Current) {
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
        .f64_observable_counter("container.cpu.time")
        .with_description("CPU time of the worker's cgroup, cumulative")
        .with_unit("s")
        .with_callback(move |o| {
            with_current(&c, |h| {
                for w in &h.workers {
                    o.observe(w.cpu_ns_total as f64 / 1e9, &worker_attributes(w))
                }
            })
        })
        .build();
    let c = Arc::clone(current);
    meter
        .f64_observable_gauge("container.cpu.usage")
        .with_description("CPUs the worker used over the interval (1 = one CPU busy)")
        .with_unit("{cpu}")
        .with_callback(move |o| {
            with_current(&c, |h| {
                for w in &h.workers {
                    if let Some(p) = w.cpu_pct {
                        o.observe(p / 100.0, &worker_attributes(w))
                    }
                }
            })
        })
        .build();
    let c = Arc::clone(current);
    meter
        .u64_observable_gauge("container.memory.usage")
        .with_description("Memory charged to the worker")
        .with_unit("By")
        .with_callback(move |o| {
            with_current(&c, |h| {
                for w in &h.workers {
                    if let Some(m) = &w.memory {
                        o.observe(m.current_bytes, &worker_attributes(w))
                    }
                }
            })
        })
        .build();
    let c = Arc::clone(current);
    meter
        .u64_observable_counter("container.disk.io")
        .with_description("Storage-level bytes the worker read and wrote, cumulative")
        .with_unit("By")
        .with_callback(move |o| {
            with_current(&c, |h| {
                for w in &h.workers {
                    for (direction, bytes) in
                        [("read", w.io_read_bytes_total), ("write", w.io_write_bytes_total)]
                    {
                        if let Some(bytes) = bytes {
                            let [g, i] = worker_attributes(w);
                            o.observe(bytes, &[g, i, KeyValue::new("disk.io.direction", direction)])
                        }
                    }
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
