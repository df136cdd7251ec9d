//! The contract with today's rbee coordinator (queen-rbee): its `ProcessStats` worker record,
//! the `telemetry` event of the heartbeat stream, and the `ready` callback that makes the
//! queen subscribe. Field names and JSON types are the queen's, exactly: it parses each
//! worker on its own and silently drops any that fails, so a `null` or a float where it
//! expects an integer would make that worker invisible to its scheduling.
//!
//! These records only format a [`Heartbeat`]; no figure is computed here.
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::heartbeat::{DeviceVitals, Heartbeat, Source, Worker};

const MIB: f64 = (1u64 << 20) as f64;

/// One worker as the queen types it, plus two extensions it ignores: `unknown` and
/// `gpu_devices`.
///
/// The queen's fields cannot be `null`. A figure known to be zero is 0 (a host without any
/// GPU: `gpu_util_pct`, `vram_mb` and `total_vram_mb` are 0). A figure not known this
/// interval gets 0 too, and its name is listed in `unknown`; the full heartbeat has it as
/// `null`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProcessStats {
    pub pid: u32,
    pub group: Arc<str>,
    pub instance: Arc<str>,
    pub cpu_pct: f64,
    pub rss_mb: u64,
    pub io_r_mb_s: f64,
    pub io_w_mb_s: f64,
    pub uptime_s: u64,
    pub gpu_util_pct: f64,
    pub vram_mb: u64,
    /// VRAM of the devices the worker's processes are on, or of every device when they are
    /// on none.
    pub total_vram_mb: u64,
    pub model: Option<Arc<str>>,
    /// Names of the fields above whose value is not known this interval.
    pub unknown: Vec<String>,
    /// The devices the worker's processes are on (empty: none, or not known).
    pub gpu_devices: Vec<u32>,
}

/// rbee's `HiveInfo`, which subscribers other than the queen (its UI SDK) parse.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HiveInfo {
    pub id: String,
    pub hostname: String,
    pub port: u16,
    /// `ready`, or `stopping` in the last event before the daemon exits.
    pub operational_status: String,
    pub health_status: HealthStatus,
    pub version: String,
    /// Extension: the hive's devices, as in the full heartbeat; `null` when GPU figures
    /// are unavailable.
    pub vram_per_device: Option<Vec<DeviceVitals>>,
}

/// rbee's `HealthStatus`, tagged on `status`; this daemon only ever says `healthy`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HealthStatus {
    pub status: String,
}

/// An event of `GET /v1/heartbeats/stream`, tagged on `type` as the queen deserialises it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HiveEvent {
    Telemetry {
        hive_id: String,
        hive_info: HiveInfo,
        /// RFC 3339.
        timestamp: String,
        workers: Vec<ProcessStats>,
    },
}

/// The body of `POST {queen}/v1/hive/ready`. The queen opens `{hive_url}/v1/heartbeats/stream`
/// with the URL as given, so it carries no trailing `/`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ready {
    pub hive_id: String,
    pub hive_url: String,
}

impl HiveEvent {
    pub fn telemetry(hb: &Heartbeat) -> Self {
        HiveEvent::Telemetry {
            hive_id: hb.hive.id.clone(),
            hive_info: HiveInfo {
                id: hb.hive.id.clone(),
                hostname: hb.hive.hostname.clone(),
                port: hb.hive.port,
                operational_status: hb.hive.operational_status.clone(),
                health_status: HealthStatus { status: hb.hive.health_status.clone() },
                version: hb.hive.version.clone(),
                vram_per_device: hb.hive.vram_per_device.clone(),
            },
            timestamp: hb.timestamp.clone(),
            workers: hb.workers.iter().map(|w| ProcessStats::new(w, hb)).collect(),
        }
    }
}

impl ProcessStats {
    pub fn new(w: &Worker, hb: &Heartbeat) -> Self {
        let mut unknown = Vec::new();
        let mut or_zero = |name: &'static str, known: Option<f64>| {
            known.unwrap_or_else(|| {
                unknown.push(name);
                0.0
            })
        };
        let cpu_pct = or_zero("cpu_pct", w.cpu_pct);
        let io_r_mb_s = or_zero("io_r_mb_s", w.io_r_mb_s);
        let io_w_mb_s = or_zero("io_w_mb_s", w.io_w_mb_s);
        let gpu = Gpu::of(w, hb);
        let gpu_util_pct = or_zero("gpu_util_pct", gpu.util_pct);
        let mut or_zero = |name: &'static str, known: Option<u64>| {
            known.unwrap_or_else(|| {
                unknown.push(name);
                0
            })
        };
        ProcessStats {
            pid: or_zero("pid", w.pid.map(u64::from)) as u32,
            rss_mb: or_zero("rss_mb", w.rss_mb),
            uptime_s: or_zero("uptime_s", w.uptime_s),
            vram_mb: or_zero("vram_mb", gpu.vram_mb),
            total_vram_mb: or_zero("total_vram_mb", gpu.total_vram_mb),
            group: w.group.clone(),
            instance: w.instance.clone(),
            cpu_pct,
            io_r_mb_s,
            io_w_mb_s,
            gpu_util_pct,
            model: w.model.clone(),
            unknown: unknown.into_iter().map(String::from).collect(),
            gpu_devices: w.gpus.iter().flatten().map(|g| g.device_index).collect(),
        }
    }
}

/// A worker's GPU figures as far as they are known.
struct Gpu {
    util_pct: Option<f64>,
    vram_mb: Option<u64>,
    total_vram_mb: Option<u64>,
}

impl Gpu {
    fn of(w: &Worker, hb: &Heartbeat) -> Self {
        if hb.collector.gpu == Source::None {
            return Gpu { util_pct: Some(0.0), vram_mb: Some(0), total_vram_mb: Some(0) };
        }
        let Some(devices) = &hb.hive.vram_per_device else {
            return Gpu { util_pct: None, vram_mb: None, total_vram_mb: None };
        };
        let on: Vec<u32> = w.gpus.iter().flatten().map(|g| g.device_index).collect();
        // A device the worker is on but that dropped out of this heartbeat (lost) leaves the
        // total unknown, as does one whose size NVML refused.
        let totals: Option<Vec<u64>> = match on.is_empty() {
            true => devices.iter().map(|d| d.vram_total_bytes).collect(),
            false => on
                .iter()
                .map(|i| devices.iter().find(|d| d.device_index == *i).and_then(|d| d.vram_total_bytes))
                .collect(),
        };
        Gpu {
            util_pct: w.gpu_util_pct,
            vram_mb: w.vram_mb,
            total_vram_mb: totals.map(|t| (t.iter().sum::<u64>() as f64 / MIB).round() as u64),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    /// A real heartbeat (one worker, no NVML, no NVIDIA driver), patched by `edit`.
    fn heartbeat(edit: impl FnOnce(&mut Value)) -> Heartbeat {
        let mut hb: Value =
            serde_json::from_str(include_str!("../../fuzz/seeds/heartbeat/one-worker.json")).unwrap();
        edit(&mut hb);
        serde_json::from_value(hb).unwrap()
    }

    fn stats(hb: &Heartbeat) -> Value {
        let HiveEvent::Telemetry { workers, .. } = HiveEvent::telemetry(hb);
        serde_json::to_value(&workers[0]).unwrap()
    }

    fn device(index: u32, total: Option<u64>) -> Value {
        json!({ "device_index": index, "vram_used_gb": null, "vram_total_gb": null,
                "vram_utilization_percent": null, "name": null, "uuid": null,
                "gpu_utilization_percent": null, "temperature_c": null,
                "vram_used_bytes": null, "vram_total_bytes": total })
    }

    /// Every field of the queen's record is there with its JSON type; what is `null` in
    /// the heartbeat is 0 and named in `unknown`.
    #[test]
    fn unknown_figures_are_named_not_invented() {
        let hb = heartbeat(|hb| {
            let w = &mut hb["workers"][0];
            for f in ["pid", "cpu_pct", "rss_mb", "io_w_mb_s", "uptime_s"] {
                w[f] = Value::Null;
            }
            hb["collector"]["gpu"] = json!("unavailable");
        });
        let s = stats(&hb);
        for (f, integer) in [
            ("pid", true),
            ("rss_mb", true),
            ("uptime_s", true),
            ("vram_mb", true),
            ("total_vram_mb", true),
            ("cpu_pct", false),
            ("io_r_mb_s", false),
            ("io_w_mb_s", false),
            ("gpu_util_pct", false),
        ] {
            assert!(s[f].is_number(), "{f}: {s}");
            assert_eq!(
                s[f].is_u64(),
                integer,
                "{f} must be {}: {s}",
                if integer { "an integer" } else { "a float" }
            );
        }
        let mut unknown: Vec<&str> =
            s["unknown"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        unknown.sort_unstable();
        assert_eq!(
            unknown,
            ["cpu_pct", "gpu_util_pct", "io_w_mb_s", "pid", "rss_mb", "total_vram_mb", "uptime_s", "vram_mb"]
        );
        assert_eq!((s["cpu_pct"].as_f64(), s["pid"].as_u64()), (Some(0.0), Some(0)));
        assert_eq!(
            s["io_r_mb_s"],
            hb.workers[0].io_r_mb_s.map(Value::from).unwrap(),
            "a known figure is kept"
        );
    }

    /// On a host with no GPU, the worker's GPU use is a known zero.
    #[test]
    fn no_gpu_is_a_known_zero() {
        let hb = heartbeat(|hb| hb["collector"]["gpu"] = json!("none"));
        let s = stats(&hb);
        assert_eq!(
            (s["gpu_util_pct"].as_f64(), s["vram_mb"].as_u64(), s["total_vram_mb"].as_u64()),
            (Some(0.0), Some(0), Some(0))
        );
        assert!(
            !s["unknown"].as_array().unwrap().iter().any(|u| u.as_str().unwrap().contains("vram")),
            "{s}"
        );
    }

    /// `total_vram_mb`: the devices the worker is on, or all of them when it is on none;
    /// unknown when one of those sizes is.
    #[test]
    fn total_vram_is_that_of_the_devices_used() {
        let gib = 1u64 << 30;
        let on = |devices: Value, gpus: Value| {
            stats(&heartbeat(|hb| {
                hb["collector"]["gpu"] = json!("nvml");
                hb["hive"]["vram_per_device"] = devices;
                hb["workers"][0]["gpus"] = gpus;
                hb["workers"][0]["gpu_util_pct"] = json!(0.0);
                hb["workers"][0]["vram_mb"] = json!(0);
            }))
        };
        let two = json!([device(0, Some(8 * gib)), device(1, Some(16 * gib))]);
        let on_one = json!([{ "device_index": 1, "vram_bytes": 0, "sm_util_pct": 0.0 }]);
        assert_eq!(on(two.clone(), on_one.clone())["total_vram_mb"], 16 * 1024);
        assert_eq!(on(two.clone(), json!([]))["total_vram_mb"], 24 * 1024);
        let s = on(json!([device(0, Some(8 * gib)), device(1, None)]), on_one);
        assert!(s["unknown"].as_array().unwrap().contains(&json!("total_vram_mb")), "{s}");
        assert_eq!(on(two, json!([]))["gpu_devices"], json!([]));
    }
}
