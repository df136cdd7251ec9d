//! The pull side: `GET /v1/heartbeat`, `/v1/capabilities`, `/metrics` (Prometheus metrics,
//! `sinks::metrics`), `/healthz`, and `/v1/heartbeats/stream` (Server-Sent Events, rbee's
//! telemetry stream), served from the latest heartbeat on a thread of its own (axum on a
//! one-thread tokio runtime). Off loopback every request needs the bearer token.
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
    extract::{DefaultBodyLimit, State},
    http::{header, HeaderMap, StatusCode},
    middleware,
    response::{
        sse::{Event, KeepAlive, Sse},
        IntoResponse, Response,
    },
    routing::get,
    Json, Router,
};
use monitor_coordinator::http::{limit_headers, require_token, RequiredToken};
use monitor_wire::rbee::HiveEvent;
use serde::Serialize;
use tokio::sync::broadcast;

use super::metrics::SelfTotals;
use crate::{
    error::{Error, Result},
    heartbeat::Heartbeat,
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
    self_totals: Arc<RwLock<SelfTotals>>,
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
            self_totals: Default::default(),
        };
        let token = RequiredToken(token.map(Into::into));
        let kept = shared.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| api_err(e.to_string()))?;
        crate::privilege::spawn_unprivileged("pull-api", move || {
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

    /// Makes `heartbeat` the one served, and sends it to the stream's subscribers; its
    /// interval's cost adds to the daemon's totals.
    pub fn publish(&self, heartbeat: Arc<Heartbeat>) {
        {
            let mut own = self.shared.self_totals.write().unwrap_or_else(|e| e.into_inner());
            own.cpu_s += heartbeat.collector.self_cost.cpu_s;
            own.kernel_s += heartbeat.collector.self_cost.kernel_s;
        }
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

/// The latest heartbeat as Prometheus metrics (see `sinks::metrics`): OpenMetrics when the
/// request asks for it, else the classic text format.
async fn metrics(State(shared): State<Shared>, headers: HeaderMap) -> Response {
    let Some(hb) = latest(&shared) else { return not_yet() };
    let own = *shared.self_totals.read().unwrap_or_else(|e| e.into_inner());
    let openmetrics =
        super::metrics::wants_openmetrics(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    match super::metrics::encode_text(&super::metrics::registry(&hb, own), openmetrics) {
        Ok(body) => {
            let kind = if openmetrics { super::metrics::OPENMETRICS } else { super::metrics::TEXT_0_0_4 };
            ([(header::CONTENT_TYPE, kind)], body).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics: {e}\n")).into_response(),
    }
}
