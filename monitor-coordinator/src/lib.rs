//! `hive-coordinator` (also `hive-monitor coordinator`): a reference coordinator ("queen"). Hives reach it both ways
//! rbee has used: they push heartbeats (`POST /v1/hive-heartbeat`), or they announce
//! themselves (`POST /v1/hive/ready`) and it subscribes to their heartbeat stream. It keeps
//! the latest of each hive, marks a hive stale after two of its intervals without news,
//! drops a pushing hive after ten and a streaming one as soon as its stream closes, and
//! answers the questions a scheduler asks: idle workers, workers serving a model, workers
//! with enough free VRAM on their device.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    extract::{DefaultBodyLimit, Query, State},
    http::StatusCode,
    middleware,
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use monitor_wire::{
    ack::Ack,
    filter::{free_vram_mb, matches, Facts, WorkerFilter},
    heartbeat::{Heartbeat, Worker, SCHEMA_VERSION},
    rbee::{HiveEvent, HiveInfo, ProcessStats, Ready},
};
use serde::Serialize;

use crate::http::{limit_headers, require_token, RequiredToken};

pub mod http;

/// Why the coordinator could not start or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("coordinator on {addr}: a coordinator off loopback needs a token (--token-file)")]
    TokenRequired { addr: SocketAddr },
    #[error("coordinator on {addr}: {source}")]
    Serve { addr: SocketAddr, source: std::io::Error },
    #[error("coordinator: HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// A heartbeat of a few hundred workers is well under this.
const MAX_BODY: usize = 4 << 20;
const STALE_AFTER_INTERVALS: f64 = 2.0;
const DROP_AFTER_INTERVALS: f64 = 10.0;

/// What the coordinator last heard from a hive.
enum Report {
    /// Pushed to `/v1/hive-heartbeat`.
    Heartbeat(Box<Heartbeat>),
    /// An event of the hive's stream, which this coordinator subscribed to.
    Telemetry { hive_info: HiveInfo, workers: Vec<ProcessStats> },
}

struct Hive {
    report: Report,
    received: Instant,
    /// Time between the hive's heartbeats: its own figure when pushed, the gap between the
    /// last two events when streamed.
    interval: Duration,
    seq: u64,
}

impl Hive {
    fn interval(&self) -> Duration {
        self.interval.clamp(Duration::from_millis(10), Duration::from_secs(3600))
    }

    fn stale(&self, now: Instant) -> bool {
        now.duration_since(self.received) > self.interval().mul_f64(STALE_AFTER_INTERVALS)
    }

    /// A pushed hive that stopped pushing. A streamed one is removed when its stream closes.
    fn dropped(&self, now: Instant) -> bool {
        matches!(self.report, Report::Heartbeat(_))
            && now.duration_since(self.received) > self.interval().mul_f64(DROP_AFTER_INTERVALS)
    }
}

/// Stream subscriptions by hive id, with the URL each one follows.
type Subscriptions = HashMap<String, (String, tokio::task::JoinHandle<()>)>;

#[derive(Clone)]
struct Queen {
    hives: Arc<Mutex<HashMap<String, Hive>>>,
    subscriptions: Arc<Mutex<Subscriptions>>,
    client: reqwest::Client,
}

/// Serves until the process is stopped.
pub fn run(addr: SocketAddr, token: Option<String>) -> Result<(), Error> {
    if !addr.ip().is_loopback() && token.is_none() {
        return Err(Error::TokenRequired { addr });
    }
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .user_agent(concat!("hive-monitor-coordinator/", env!("CARGO_PKG_VERSION")))
        .build()?;
    let queen = Queen { hives: Arc::default(), subscriptions: Arc::default(), client };
    let token = RequiredToken(token.map(Into::into));
    let app = Router::new()
        .route("/v1/hive-heartbeat", post(receive))
        .route("/v1/hive/ready", post(ready))
        .route("/v1/hives", get(hives))
        .route("/v1/workers", get(workers))
        .layer(middleware::from_fn_with_state(token, require_token))
        .layer(middleware::from_fn(limit_headers))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(queen);
    let serve = |source| Error::Serve { addr, source };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(serve)?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(serve)?;
        let bound = listener.local_addr().map_err(serve)?;
        log::info!("coordinator listening on http://{bound}");
        axum::serve(listener, app).await.map_err(serve)
    })
}

fn ok() -> Ack {
    Ack { server_status: Some("ok".into()), next_interval_ms: None }
}

/// A request body that is a heartbeat of a schema version this coordinator knows, or the
/// status and reason to refuse it with.
pub fn parse_heartbeat(body: &[u8]) -> std::result::Result<Heartbeat, (StatusCode, String)> {
    let heartbeat: Heartbeat = serde_json::from_slice(body)
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("not a heartbeat: {e}\n")))?;
    if heartbeat.schema_version != SCHEMA_VERSION {
        let msg = format!(
            "schema_version {} not supported (this coordinator knows {SCHEMA_VERSION})\n",
            heartbeat.schema_version
        );
        return Err((StatusCode::UNPROCESSABLE_ENTITY, msg));
    }
    Ok(heartbeat)
}

/// Takes a heartbeat that parses as the typed model, of a schema version this coordinator
/// knows.
async fn receive(State(queen): State<Queen>, body: axum::body::Bytes) -> Response {
    let heartbeat = match parse_heartbeat(&body) {
        Ok(h) => h,
        Err(refusal) => return refusal.into_response(),
    };
    let now = Instant::now();
    let mut hives = queen.hives.lock().unwrap_or_else(|e| e.into_inner());
    hives.retain(|_, h| !h.dropped(now));
    let interval = Duration::from_secs_f64((heartbeat.interval_ms / 1000.0).clamp(0.01, 3600.0));
    let seq = heartbeat.seq;
    hives.insert(
        heartbeat.hive.id.clone(),
        Hive { report: Report::Heartbeat(Box::new(heartbeat)), received: now, interval, seq },
    );
    Json(ok()).into_response()
}

/// `POST /v1/hive/ready`: subscribes to the hive's stream. Unlike rbee's queen, a hive that
/// announces itself again while its subscription runs gets no second one.
async fn ready(State(queen): State<Queen>, Json(ready): Json<Ready>) -> Response {
    let url = match stream_url(&ready.hive_url) {
        Ok(u) => u,
        Err(why) => return (StatusCode::UNPROCESSABLE_ENTITY, format!("hive_url: {why}\n")).into_response(),
    };
    let mut subscriptions = queen.subscriptions.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((old, task)) = subscriptions.get(&ready.hive_id) {
        if *old == url && !task.is_finished() {
            return Json(ok()).into_response();
        }
        task.abort();
    }
    log::info!("hive {} ready at {}; subscribing", ready.hive_id, ready.hive_url);
    let task = tokio::spawn(subscribe(queen.clone(), ready.hive_id.clone(), url.clone()));
    subscriptions.insert(ready.hive_id, (url, task));
    Json(ok()).into_response()
}

fn stream_url(hive_url: &str) -> std::result::Result<String, String> {
    let url = format!("{hive_url}/v1/heartbeats/stream");
    match reqwest::Url::parse(&url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => Ok(url),
        Ok(_) => Err("only http:// and https:// are supported".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// How long after a stream closes it is opened again (as rbee's queen does).
const RECONNECT: Duration = Duration::from_secs(5);

/// Follows a hive's stream: each event replaces what is known of the hive; when the stream
/// closes the hive is removed at once and the stream opened again after `RECONNECT`.
async fn subscribe(queen: Queen, hive_id: String, url: String) {
    use eventsource_stream::Eventsource;
    use futures_util::StreamExt;
    loop {
        match queen.client.get(&url).send().await.and_then(|r| r.error_for_status()) {
            Ok(response) => {
                log::info!("subscribed to {url}");
                let mut events = response.bytes_stream().eventsource();
                while let Some(event) = events.next().await {
                    let event = match event {
                        Ok(e) => e,
                        Err(e) => {
                            log::warn!("stream of hive {hive_id}: {e}");
                            break;
                        }
                    };
                    match serde_json::from_str::<HiveEvent>(&event.data) {
                        Ok(e) => queen.telemetry(&hive_id, e, event.id.parse().unwrap_or(0)),
                        Err(e) => log::warn!("hive {hive_id}: an event that is no telemetry dropped: {e}"),
                    }
                }
                log::info!("stream of hive {hive_id} closed; removed, reconnecting in {RECONNECT:?}");
            }
            Err(e) => log::warn!("subscribing to {url}: {e}; again in {RECONNECT:?}"),
        }
        queen.hives.lock().unwrap_or_else(|e| e.into_inner()).remove(&hive_id);
        tokio::time::sleep(RECONNECT).await;
    }
}

impl Queen {
    fn telemetry(&self, subscribed_as: &str, event: HiveEvent, seq: u64) {
        let HiveEvent::Telemetry { hive_id, hive_info, workers, .. } = event;
        if hive_id != subscribed_as {
            log::warn!(
                "the stream of hive {subscribed_as} sends telemetry of {hive_id}; kept as {subscribed_as}"
            );
        }
        let now = Instant::now();
        let mut hives = self.hives.lock().unwrap_or_else(|e| e.into_inner());
        let interval =
            hives.get(subscribed_as).map_or(Duration::from_secs(1), |h| now.duration_since(h.received));
        let report = Report::Telemetry { hive_info, workers };
        hives.insert(subscribed_as.to_string(), Hive { report, received: now, interval, seq });
    }
}

#[derive(Serialize)]
struct HiveStatus {
    id: String,
    stale: bool,
    seconds_since_heartbeat: f64,
    seq: u64,
    workers: usize,
    /// `push` or `stream`.
    protocol: &'static str,
}

async fn hives(State(queen): State<Queen>) -> Json<Vec<HiveStatus>> {
    let now = Instant::now();
    let mut hives = queen.hives.lock().unwrap_or_else(|e| e.into_inner());
    hives.retain(|_, h| !h.dropped(now));
    let mut out: Vec<HiveStatus> = hives
        .iter()
        .map(|(id, h)| HiveStatus {
            id: id.clone(),
            stale: h.stale(now),
            seconds_since_heartbeat: now.duration_since(h.received).as_secs_f64(),
            seq: h.seq,
            workers: match &h.report {
                Report::Heartbeat(hb) => hb.workers.len(),
                Report::Telemetry { workers, .. } => workers.len(),
            },
            protocol: match h.report {
                Report::Heartbeat(_) => "push",
                Report::Telemetry { .. } => "stream",
            },
        })
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Json(out)
}

/// A worker as a hive reported it: the full heartbeat's record, or the stream's.
#[derive(Serialize)]
#[serde(untagged)]
enum Record<'a> {
    Full(&'a Worker),
    Strict(&'a ProcessStats),
}

#[derive(Serialize)]
struct WorkerEntry<'a> {
    hive_id: &'a str,
    hive_stale: bool,
    /// Free VRAM (MiB) on the worker's devices, the least of them; `null` on no GPU.
    free_vram_mb: Option<u64>,
    #[serde(flatten)]
    worker: Record<'a>,
}

async fn workers(State(queen): State<Queen>, Query(filter): Query<WorkerFilter>) -> Response {
    let now = Instant::now();
    let mut hives = queen.hives.lock().unwrap_or_else(|e| e.into_inner());
    hives.retain(|_, h| !h.dropped(now));
    let mut candidates: Vec<(&str, &Hive, Facts, Option<u64>, Record)> = Vec::new();
    for (id, h) in hives.iter() {
        match &h.report {
            Report::Heartbeat(hb) => candidates.extend(hb.workers.iter().map(|w| {
                let on: Vec<u32> = w.gpus.iter().flatten().map(|g| g.device_index).collect();
                let free = free_vram_mb(hb.hive.vram_per_device.as_deref(), &on);
                (id.as_str(), h, Facts::of_worker(w), free, Record::Full(w))
            })),
            Report::Telemetry { hive_info, workers } => candidates.extend(workers.iter().map(|w| {
                let free = free_vram_mb(hive_info.vram_per_device.as_deref(), &w.gpu_devices);
                (id.as_str(), h, Facts::of_stats(w), free, Record::Strict(w))
            })),
        }
    }
    candidates.retain(|(_, _, facts, free, _)| matches(&filter, facts, *free));
    candidates.sort_by(|a, b| (a.0, a.2.group, a.2.instance).cmp(&(b.0, b.2.group, b.2.instance)));
    let out: Vec<WorkerEntry> = candidates
        .into_iter()
        .map(|(hive_id, h, _, free_vram_mb, worker)| WorkerEntry {
            hive_id,
            hive_stale: h.stale(now),
            free_vram_mb,
            worker,
        })
        .collect();
    Json(out).into_response()
}
