//! The pull side: `GET /v1/heartbeat`, `/v1/capabilities`, `/metrics` (OpenMetrics text,
//! which Prometheus scrapes, encoded by prometheus-client), `/healthz`, and
//! `/v1/heartbeats/stream` (Server-Sent Events, rbee's telemetry stream), served from the
//! latest heartbeat on a thread of its own (axum on a one-thread tokio runtime). Off
//! loopback every request needs the bearer token.
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, RwLock,
    },
    time::Duration,
};

use axum::{
    extract::{DefaultBodyLimit, Request, State},
    http::{header, HeaderMap, StatusCode},
    middleware::{self, Next},
    response::{
        sse::{Event, KeepAlive, Sse},
        IntoResponse, Response,
    },
    routing::get,
    Json, Router,
};
use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use serde::Serialize;
use subtle::ConstantTimeEq;
use tokio::sync::broadcast;

use crate::{
    error::{Error, Result},
    heartbeat::Heartbeat,
    rbee::HiveEvent,
    sinks::stall::GuardedListener,
};

/// Requests carry no body worth having; anything larger is refused.
const MAX_BODY: usize = 1024;

/// Stream events a subscriber may fall behind by before it is dropped (it may reconnect);
/// the publisher never waits for a subscriber.
const STREAM_BACKLOG: usize = 8;
/// A comment line on the stream when no event has gone out for this long, so proxies and
/// the subscriber see a live connection at long intervals.
const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// A connection that takes none of what is written to it for this long is closed: a
/// subscriber that stopped reading holds no memory beyond its socket's buffers.
const WRITE_STALL: Duration = Duration::from_secs(30);

/// A telemetry event, serialised once for every subscriber.
#[derive(Clone)]
struct StreamEvent {
    seq: u64,
    data: Arc<str>,
}

#[derive(Clone)]
struct Shared {
    latest: Arc<RwLock<Option<Arc<Heartbeat>>>>,
    events: broadcast::Sender<StreamEvent>,
    subscribers: Arc<AtomicUsize>,
}

pub struct PullApi {
    shared: Shared,
    pub addr: SocketAddr,
}

impl PullApi {
    /// Binds `addr` and serves from a background thread. A non-loopback address needs a
    /// token.
    pub fn start(addr: SocketAddr, token: Option<String>) -> Result<Self> {
        if !addr.ip().is_loopback() && token.is_none() {
            return Err(Error::Api {
                addr,
                reason: "a pull API off loopback needs a token (--api-token-file)".into(),
            });
        }
        let api_err = |reason: String| Error::Api { addr, reason };
        let listener = std::net::TcpListener::bind(addr).map_err(|e| api_err(e.to_string()))?;
        listener.set_nonblocking(true).map_err(|e| api_err(e.to_string()))?;
        let bound = listener.local_addr().map_err(|e| api_err(e.to_string()))?;
        let shared = Shared {
            latest: Arc::new(RwLock::new(None)),
            events: broadcast::Sender::new(STREAM_BACKLOG),
            subscribers: Arc::new(AtomicUsize::new(0)),
        };
        let token = RequiredToken(token.map(Into::into));
        let kept = shared.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| api_err(e.to_string()))?;
        std::thread::Builder::new()
            .name("pull-api".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let app = Router::new()
                        .route("/healthz", get(|| async { "ok\n" }))
                        .route("/v1/heartbeat", get(heartbeat))
                        .route("/v1/capabilities", get(capabilities))
                        .route("/metrics", get(metrics))
                        .route("/v1/heartbeats/stream", get(stream))
                        .layer(middleware::from_fn_with_state(token, require_token))
                        .layer(middleware::from_fn(limit_headers))
                        .layer(DefaultBodyLimit::max(MAX_BODY))
                        .with_state(shared);
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => {
                            if let Err(e) = axum::serve(GuardedListener::new(l, WRITE_STALL), app).await {
                                log::error!("pull API on {bound} stopped: {e}");
                            }
                        }
                        Err(e) => log::error!("pull API on {bound}: {e}"),
                    }
                })
            })
            .map_err(|e| api_err(e.to_string()))?;
        log::info!("pull API on http://{bound}");
        Ok(Self { shared: kept, addr: bound })
    }

    /// Makes `heartbeat` the one served, and sends it to the stream's subscribers.
    pub fn publish(&self, heartbeat: Arc<Heartbeat>) {
        // Stored before it is sent: a subscriber arriving between the two gets it as its
        // first event, and skips the copy sent.
        *self.shared.latest.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::clone(&heartbeat));
        if self.shared.events.receiver_count() > 0 {
            if let Some(event) = stream_event(&heartbeat) {
                // Fails only when the last subscriber left meanwhile.
                let _ = self.shared.events.send(event);
            }
        }
    }

    /// The number of the stream's subscribers, kept up to date.
    pub fn subscriber_gauge(&self) -> Arc<AtomicUsize> {
        Arc::clone(&self.shared.subscribers)
    }

    /// Subscribers of the heartbeat stream now.
    pub fn subscribers(&self) -> u32 {
        self.shared.subscribers.load(Ordering::Relaxed).try_into().unwrap_or(u32::MAX)
    }
}

fn stream_event(hb: &Heartbeat) -> Option<StreamEvent> {
    match serde_json::to_string(&HiveEvent::telemetry(hb)) {
        Ok(data) => Some(StreamEvent { seq: hb.seq, data: data.into() }),
        Err(e) => {
            log::error!("heartbeat {} not serialisable as a telemetry event: {e}", hb.seq);
            None
        }
    }
}

/// One subscriber of the stream, counted while it is connected.
struct Subscriber {
    count: Arc<AtomicUsize>,
    events: broadcast::Receiver<StreamEvent>,
    /// The latest heartbeat when it connected, sent first.
    first: Option<StreamEvent>,
    /// The newest event sent.
    last_seq: u64,
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Subscriber {
    async fn next(mut self) -> Option<(std::result::Result<Event, Infallible>, Self)> {
        let event = match self.first.take() {
            Some(e) => e,
            None => loop {
                match self.events.recv().await {
                    // Published while this subscriber was sent the latest one.
                    Ok(e) if e.seq <= self.last_seq => continue,
                    Ok(e) => break e,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        log::warn!("a heartbeat stream subscriber fell {n} events behind; dropped");
                        return None;
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            },
        };
        self.last_seq = event.seq;
        let sse = Event::default().event("heartbeat").id(event.seq.to_string()).data(&*event.data);
        Some((Ok(sse), self))
    }
}

/// `GET /v1/heartbeats/stream`: one `telemetry` event per heartbeat, the latest first.
async fn stream(State(shared): State<Shared>) -> Response {
    // Subscribed before the latest is taken, so no heartbeat falls between the two.
    let events = shared.events.subscribe();
    let first = latest(&shared).and_then(|hb| stream_event(&hb));
    shared.subscribers.fetch_add(1, Ordering::Relaxed);
    let subscriber = Subscriber { count: Arc::clone(&shared.subscribers), events, first, last_seq: 0 };
    let events = futures_util::stream::unfold(subscriber, Subscriber::next);
    Sse::new(events).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)).into_response()
}

/// Bytes of request headers (names and values) a server takes; more is refused (431).
pub const MAX_HEADER_BYTES: usize = 16 << 10;

/// Middleware refusing requests whose headers exceed `MAX_HEADER_BYTES`.
pub async fn limit_headers(request: Request, next: Next) -> Response {
    let size: usize = request.headers().iter().map(|(n, v)| n.as_str().len() + v.len()).sum();
    if size > MAX_HEADER_BYTES {
        let msg = format!("request headers are {size} bytes; at most {MAX_HEADER_BYTES}\n");
        return (StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, msg).into_response();
    }
    next.run(request).await
}

/// The bearer token a server requires (`None`: open); state of `require_token`.
#[derive(Clone)]
pub struct RequiredToken(pub Option<Arc<str>>);

/// Middleware refusing requests without the token, compared in constant time.
pub async fn require_token(
    State(token): State<RequiredToken>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    if let Some(token) = &token.0 {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
            return (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], "token required\n")
                .into_response();
        }
    }
    next.run(request).await
}

fn latest(shared: &Shared) -> Option<Arc<Heartbeat>> {
    shared.latest.read().unwrap_or_else(|e| e.into_inner()).clone()
}

fn not_yet() -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, "no heartbeat yet\n").into_response()
}

async fn heartbeat(State(shared): State<Shared>) -> Response {
    match latest(&shared) {
        Some(hb) => Json(&*hb).into_response(),
        None => not_yet(),
    }
}

#[derive(Serialize)]
struct Capabilities {
    hive_id: String,
    cpu_cores: usize,
    ram_total_gb: Option<f64>,
    /// `null` when GPU figures are unavailable.
    gpus: Option<Vec<GpuCapability>>,
}

#[derive(Serialize)]
struct GpuCapability {
    device_index: u32,
    name: Option<String>,
    uuid: Option<String>,
    vram_total_gb: Option<f64>,
    vram_free_gb: Option<f64>,
}

async fn capabilities(State(shared): State<Shared>) -> Response {
    let Some(hb) = latest(&shared) else { return not_yet() };
    let gpus = hb.hive.vram_per_device.as_ref().map(|devices| {
        devices
            .iter()
            .map(|d| GpuCapability {
                device_index: d.device_index,
                name: d.name.clone(),
                uuid: d.uuid.clone(),
                vram_total_gb: d.vram_total_gb,
                vram_free_gb: d
                    .vram_total_gb
                    .zip(d.vram_used_gb)
                    .map(|(t, u)| ((t - u) * 1000.0).round() / 1000.0),
            })
            .collect()
    });
    Json(Capabilities {
        hive_id: hb.hive.id.clone(),
        cpu_cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        ram_total_gb: hb.hive.ram_total_gb,
        gpus,
    })
    .into_response()
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabels {
    group: String,
    instance: String,
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SwitchLabels {
    group: String,
    instance: String,
    model: String,
    kind: &'static str,
}

/// `level`: `storage` (read_bytes/write_bytes semantics) or `syscall` (rchar/wchar).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IoLabels {
    group: String,
    instance: String,
    model: String,
    level: &'static str,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceLabels {
    device: String,
    uuid: String,
}

/// The latest heartbeat in Prometheus text format. Only figures present are exported: a
/// missing one is a missing series, never a 0.
async fn metrics(State(shared): State<Shared>) -> Response {
    let Some(hb) = latest(&shared) else { return not_yet() };
    let mut body = String::new();
    if let Err(e) = encode(&mut body, &registry(&hb)) {
        return (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics: {e}\n")).into_response();
    }
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body)
        .into_response()
}

type F64Gauge = Gauge<f64, std::sync::atomic::AtomicU64>;
type F64Counter = Counter<f64, std::sync::atomic::AtomicU64>;

fn registry(hb: &Heartbeat) -> Registry {
    let mut r = Registry::with_prefix("hive");
    let gauge = |r: &mut Registry, name: &str, help: &str, v: Option<f64>| {
        if let Some(v) = v {
            let g = F64Gauge::default();
            g.set(v);
            r.register(name, help, g);
        }
    };
    gauge(
        &mut r,
        "host_cpu_percent",
        "Busy share of all CPUs over the last interval",
        hb.hive.cpu_usage_percent,
    );
    gauge(&mut r, "host_ram_used_gigabytes", "RAM in use (GiB)", hb.hive.ram_used_gb);
    gauge(&mut r, "host_ram_total_gigabytes", "RAM installed (GiB)", hb.hive.ram_total_gb);
    gauge(
        &mut r,
        "heartbeat_seq",
        "Sequence number of the heartbeat these figures come from",
        Some(hb.seq as f64),
    );

    let cpu_pct = Family::<WorkerLabels, F64Gauge>::default();
    let mem = Family::<WorkerLabels, F64Gauge>::default();
    let vram = Family::<WorkerLabels, F64Gauge>::default();
    let gpu_pct = Family::<WorkerLabels, F64Gauge>::default();
    let cpu_s = Family::<WorkerLabels, F64Counter>::default();
    let runq_s = Family::<WorkerLabels, F64Counter>::default();
    let switches = Family::<SwitchLabels, Counter<u64>>::default();
    let io = Family::<IoLabels, Counter<u64>>::default();
    for w in &hb.workers {
        let l = WorkerLabels {
            group: w.group.clone(),
            instance: w.instance.clone(),
            model: w.model.clone().unwrap_or_default(),
        };
        if let Some(v) = w.cpu_pct {
            cpu_pct.get_or_create(&l).set(v);
        }
        if let Some(m) = &w.memory {
            mem.get_or_create(&l).set(m.current_bytes as f64);
        }
        if let Some(v) = w.vram_mb {
            vram.get_or_create(&l).set((v << 20) as f64);
        }
        if let Some(v) = w.gpu_util_pct {
            gpu_pct.get_or_create(&l).set(v);
        }
        cpu_s.get_or_create(&l).inc_by(w.cpu_ns_total as f64 / 1e9);
        if let Some(ns) = w.runq_wait_ns_total {
            runq_s.get_or_create(&l).inc_by(ns as f64 / 1e9);
        }
        for (kind, n) in
            [("voluntary", w.ctx_switches_voluntary_total), ("involuntary", w.ctx_switches_involuntary_total)]
        {
            let Some(n) = n else { continue };
            let s = SwitchLabels {
                group: l.group.clone(),
                instance: l.instance.clone(),
                model: l.model.clone(),
                kind,
            };
            switches.get_or_create(&s).inc_by(n);
        }
        for (level, direction, n) in [
            ("storage", "read", w.io_read_bytes_total),
            ("storage", "write", w.io_write_bytes_total),
            ("syscall", "read", w.io_syscall_read_bytes_total),
            ("syscall", "write", w.io_syscall_write_bytes_total),
        ] {
            let Some(n) = n else { continue };
            let s = IoLabels {
                group: l.group.clone(),
                instance: l.instance.clone(),
                model: l.model.clone(),
                level,
                direction,
            };
            io.get_or_create(&s).inc_by(n);
        }
    }
    r.register("worker_cpu_percent", "Worker on-CPU time over the last interval (100 = one core)", cpu_pct);
    r.register("worker_cpu_seconds", "Worker on-CPU time charged by the kernel", cpu_s);
    r.register("worker_runq_wait_seconds", "Time worker tasks were runnable but not running", runq_s);
    r.register("worker_context_switches", "Worker context switches", switches);
    r.register("worker_io_bytes", "Bytes the worker read and wrote, at storage and system-call level", io);
    r.register("worker_memory_bytes", "Worker memory (its memory cgroup, or summed RSS)", mem);
    r.register("worker_vram_bytes", "Worker VRAM over its processes and devices", vram);
    r.register("worker_gpu_util_percent", "Worker SM utilisation summed over devices", gpu_pct);

    let dev_util = Family::<DeviceLabels, F64Gauge>::default();
    let dev_used = Family::<DeviceLabels, F64Gauge>::default();
    let dev_total = Family::<DeviceLabels, F64Gauge>::default();
    for d in hb.hive.vram_per_device.iter().flatten() {
        let l = DeviceLabels { device: d.device_index.to_string(), uuid: d.uuid.clone().unwrap_or_default() };
        if let Some(v) = d.gpu_utilization_percent {
            dev_util.get_or_create(&l).set(v);
        }
        if let Some(v) = d.vram_used_gb {
            dev_used.get_or_create(&l).set(v);
        }
        if let Some(v) = d.vram_total_gb {
            dev_total.get_or_create(&l).set(v);
        }
    }
    r.register("gpu_utilization_percent", "GPU utilisation", dev_util);
    r.register("gpu_vram_used_gigabytes", "GPU memory in use (GiB)", dev_used);
    r.register("gpu_vram_total_gigabytes", "GPU memory installed (GiB)", dev_total);
    r
}
