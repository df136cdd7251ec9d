//! `hive-monitor coordinator`: a reference coordinator ("queen"). It receives heartbeats from
//! many hives, keeps the latest of each, marks a hive stale after two of its intervals
//! without a heartbeat and drops it after ten, and answers the questions a scheduler asks:
//! idle workers, workers serving a model, workers with enough free VRAM on their device.
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
use serde::{Deserialize, Serialize};

use crate::{
    error::{Error, Result},
    heartbeat::{Heartbeat, Worker, SCHEMA_VERSION},
    sinks::api::{limit_headers, require_token, RequiredToken},
};

/// A heartbeat of a few hundred workers is well under this.
const MAX_BODY: usize = 4 << 20;
const STALE_AFTER_INTERVALS: f64 = 2.0;
const DROP_AFTER_INTERVALS: f64 = 10.0;

struct Hive {
    heartbeat: Heartbeat,
    received: Instant,
}

impl Hive {
    fn interval(&self) -> Duration {
        Duration::from_secs_f64((self.heartbeat.interval_ms / 1000.0).clamp(0.01, 3600.0))
    }

    fn stale(&self, now: Instant) -> bool {
        now.duration_since(self.received) > self.interval().mul_f64(STALE_AFTER_INTERVALS)
    }

    fn dropped(&self, now: Instant) -> bool {
        now.duration_since(self.received) > self.interval().mul_f64(DROP_AFTER_INTERVALS)
    }
}

#[derive(Clone)]
struct Queen {
    hives: Arc<Mutex<HashMap<String, Hive>>>,
}

/// Serves until the process is stopped.
pub fn run(addr: SocketAddr, token: Option<String>) -> Result<()> {
    let err = |reason: String| Error::Api { addr, reason };
    if !addr.ip().is_loopback() && token.is_none() {
        return Err(err("a coordinator off loopback needs a token (--token-file)".into()));
    }
    let queen = Queen { hives: Arc::new(Mutex::new(HashMap::new())) };
    let token = RequiredToken(token.map(Into::into));
    let app = Router::new()
        .route("/v1/hive-heartbeat", post(receive))
        .route("/v1/hives", get(hives))
        .route("/v1/workers", get(workers))
        .layer(middleware::from_fn_with_state(token, require_token))
        .layer(middleware::from_fn(limit_headers))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(queen);
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| err(e.to_string()))?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| err(e.to_string()))?;
        let bound = listener.local_addr().map_err(|e| err(e.to_string()))?;
        log::info!("coordinator listening on http://{bound}");
        axum::serve(listener, app).await.map_err(|e| err(e.to_string()))
    })
}

#[derive(Serialize)]
struct Ack {
    server_status: &'static str,
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
    hives.insert(heartbeat.hive.id.clone(), Hive { heartbeat, received: now });
    Json(Ack { server_status: "ok" }).into_response()
}

#[derive(Serialize)]
struct HiveStatus {
    id: String,
    stale: bool,
    seconds_since_heartbeat: f64,
    seq: u64,
    workers: usize,
}

async fn hives(State(queen): State<Queen>) -> Json<Vec<HiveStatus>> {
    let now = Instant::now();
    let mut hives = queen.hives.lock().unwrap_or_else(|e| e.into_inner());
    hives.retain(|_, h| !h.dropped(now));
    let mut out: Vec<HiveStatus> = hives
        .values()
        .map(|h| HiveStatus {
            id: h.heartbeat.hive.id.clone(),
            stale: h.stale(now),
            seconds_since_heartbeat: now.duration_since(h.received).as_secs_f64(),
            seq: h.heartbeat.seq,
            workers: h.heartbeat.workers.len(),
        })
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Json(out)
}

/// `GET /v1/workers` filters; all given must hold.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerFilter {
    /// Busy on no GPU (`gpu_util_pct` 0) or, with no GPU figures, using under 1 % of a core.
    pub idle: Option<bool>,
    /// Serving this model.
    pub model: Option<String>,
    /// At least this much free VRAM (MiB) on every device the worker is on.
    pub min_free_vram_mb: Option<u64>,
}

#[derive(Serialize)]
struct WorkerEntry<'a> {
    hive_id: &'a str,
    hive_stale: bool,
    /// Free VRAM (MiB) on the worker's devices, the least of them; `null` on no GPU.
    free_vram_mb: Option<u64>,
    #[serde(flatten)]
    worker: &'a Worker,
}

async fn workers(State(queen): State<Queen>, Query(filter): Query<WorkerFilter>) -> Response {
    let now = Instant::now();
    let mut hives = queen.hives.lock().unwrap_or_else(|e| e.into_inner());
    hives.retain(|_, h| !h.dropped(now));
    let mut out = Vec::new();
    for h in hives.values() {
        for w in &h.heartbeat.workers {
            let free = free_vram_mb(&h.heartbeat, w);
            if matches(&filter, w, free) {
                out.push(WorkerEntry {
                    hive_id: &h.heartbeat.hive.id,
                    hive_stale: h.stale(now),
                    free_vram_mb: free,
                    worker: w,
                });
            }
        }
    }
    out.sort_by(|a, b| {
        (a.hive_id, &a.worker.group, &a.worker.instance).cmp(&(
            b.hive_id,
            &b.worker.group,
            &b.worker.instance,
        ))
    });
    Json(out).into_response()
}

/// The least free VRAM among the devices `w` is on.
fn free_vram_mb(hb: &Heartbeat, w: &Worker) -> Option<u64> {
    let devices = hb.hive.vram_per_device.as_ref()?;
    w.gpus
        .as_ref()?
        .iter()
        .filter_map(|g| {
            let d = devices.iter().find(|d| d.device_index == g.device_index)?;
            let free_gb = d.vram_total_gb? - d.vram_used_gb?;
            Some((free_gb.max(0.0) * 1024.0) as u64)
        })
        .min()
}

pub fn matches(filter: &WorkerFilter, w: &Worker, free_vram_mb: Option<u64>) -> bool {
    let idle = match w.gpu_util_pct {
        Some(gpu) => gpu == 0.0,
        None => w.cpu_pct.is_some_and(|c| c < 1.0),
    };
    filter.idle.is_none_or(|want| want == idle)
        && filter.model.as_ref().is_none_or(|m| w.model.as_ref() == Some(m))
        && filter.min_free_vram_mb.is_none_or(|n| free_vram_mb.is_some_and(|f| f >= n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(cpu: Option<f64>, gpu: Option<f64>, model: Option<&str>) -> Worker {
        serde_json::from_value(serde_json::json!({
            "pid": 1, "group": "g", "instance": "i", "cpu_pct": cpu, "rss_mb": null, "gpu_util_pct": gpu,
            "vram_mb": null, "model": model, "uptime_s": 1, "io_r_mb_s": null, "io_w_mb_s": null,
            "cgroup": "/g/i", "cgroup_id": 1, "processes": 1, "cpu_ns_total": 0, "runq_wait_pct": null,
            "runq_wait_ns_total": null, "runq_waits_total": null, "ctx_switches_voluntary_total": null,
            "ctx_switches_involuntary_total": null, "memory": null, "gpus": null
        }))
        .unwrap()
    }

    #[test]
    fn filters() {
        let f = |idle, model: Option<&str>, vram| WorkerFilter {
            idle,
            model: model.map(Into::into),
            min_free_vram_mb: vram,
        };
        let busy_gpu = worker(Some(50.0), Some(85.0), Some("llama"));
        let idle_gpu = worker(Some(30.0), Some(0.0), Some("llama"));
        let idle_cpu = worker(Some(0.2), None, None);
        assert!(matches(&f(None, None, None), &busy_gpu, None));
        assert!(!matches(&f(Some(true), None, None), &busy_gpu, None));
        assert!(matches(&f(Some(true), None, None), &idle_gpu, None), "GPU idle though the CPU works");
        assert!(matches(&f(Some(true), None, None), &idle_cpu, None));
        assert!(matches(&f(None, Some("llama"), None), &busy_gpu, None));
        assert!(!matches(&f(None, Some("qwen"), None), &busy_gpu, None));
        assert!(!matches(&f(None, Some("llama"), None), &idle_cpu, None), "no model named");
        assert!(matches(&f(None, None, Some(4096)), &busy_gpu, Some(8192)));
        assert!(!matches(&f(None, None, Some(4096)), &busy_gpu, Some(1024)));
        assert!(!matches(&f(None, None, Some(1)), &idle_cpu, None), "on no GPU: no free VRAM to offer");
    }
}
