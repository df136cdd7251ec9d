//! What the reference coordinator's `GET /v1/workers` filters on, from either worker record a
//! hive may send: the full heartbeat's, or rbee's strict one.
use serde::Deserialize;

use crate::{
    heartbeat::{DeviceVitals, Worker},
    rbee::ProcessStats,
};

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

/// What the filters look at, from either record.
pub struct Facts<'a> {
    pub group: &'a str,
    pub instance: &'a str,
    pub cpu_pct: Option<f64>,
    /// `None` when GPU figures are unavailable, or the host has no GPU.
    pub gpu_util_pct: Option<f64>,
    pub model: Option<&'a str>,
}

impl<'a> Facts<'a> {
    pub fn of_worker(w: &'a Worker) -> Self {
        Facts {
            group: &w.group,
            instance: &w.instance,
            cpu_pct: w.cpu_pct,
            gpu_util_pct: w.gpu_util_pct,
            model: w.model.as_deref(),
        }
    }

    /// A figure the record lists as unknown is `None`, as is GPU use on a host without any.
    pub fn of_stats(w: &'a ProcessStats) -> Self {
        let known = |name: &str, v: f64| (!w.unknown.iter().any(|u| u == name)).then_some(v);
        let no_gpu = w.total_vram_mb == 0 && w.gpu_devices.is_empty();
        Facts {
            group: &w.group,
            instance: &w.instance,
            cpu_pct: known("cpu_pct", w.cpu_pct),
            gpu_util_pct: known("gpu_util_pct", w.gpu_util_pct).filter(|_| !no_gpu),
            model: w.model.as_deref(),
        }
    }
}

/// The least free VRAM among the devices `on`.
pub fn free_vram_mb(devices: Option<&[DeviceVitals]>, on: &[u32]) -> Option<u64> {
    let devices = devices?;
    on.iter()
        .filter_map(|i| {
            let d = devices.iter().find(|d| d.device_index == *i)?;
            let free = d.vram_total_bytes?.saturating_sub(d.vram_used_bytes?);
            Some(free >> 20)
        })
        .min()
}

pub fn matches(filter: &WorkerFilter, w: &Facts, free_vram_mb: Option<u64>) -> bool {
    let idle = match w.gpu_util_pct {
        Some(gpu) => gpu == 0.0,
        None => w.cpu_pct.is_some_and(|c| c < 1.0),
    };
    filter.idle.is_none_or(|want| want == idle)
        && filter.model.as_ref().is_none_or(|m| w.model == Some(m.as_str()))
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
        let (busy_gpu, idle_gpu, idle_cpu) = (
            worker(Some(50.0), Some(85.0), Some("llama")),
            worker(Some(30.0), Some(0.0), Some("llama")),
            worker(Some(0.2), None, None),
        );
        let (busy_gpu, idle_gpu, idle_cpu) =
            (Facts::of_worker(&busy_gpu), Facts::of_worker(&idle_gpu), Facts::of_worker(&idle_cpu));
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
