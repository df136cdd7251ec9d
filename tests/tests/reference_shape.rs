//! A consumer written for the reference `HiveHeartbeat` shape parses our heartbeats
//! unchanged. The types below are the reference's (docs/design.md, The heartbeat:
//! `HiveInfo` with its system stats, `VramInfo`, the per-worker `ProcessStats` the queen's
//! scheduling code uses), with none of our extensions; serde ignores the extra fields.
//!
//! On a host where a figure has no source (no NVML: no GPU figures) docs/design.md,
//! Degradation, makes it `null` rather than a made-up 0, and a consumer must read that field
//! as an `Option`; here every source is present (the probes, and NVML through the scripted
//! library), as on a GPU host.
use std::process::{Command, Stdio};

use hive_monitor_tests::*;
use serde::Deserialize;

const DAEMON: &str = env!("CARGO_BIN_EXE_hm-daemon");
const HM_LOAD: &str = env!("CARGO_BIN_EXE_hm-load");

#[allow(dead_code)] // fields are read by serde, which is the point
#[derive(Deserialize)]
struct HiveHeartbeat {
    hive: HiveInfo,
    timestamp: String,
    workers: Vec<ProcessStats>,
}

#[allow(dead_code)]
#[derive(Deserialize)]
struct HiveInfo {
    id: String,
    hostname: String,
    port: u16,
    operational_status: String,
    health_status: String,
    version: String,
    cpu_usage_percent: f32,
    ram_used_gb: f32,
    ram_total_gb: f32,
    vram_per_device: Vec<VramInfo>,
    uptime_seconds: u64,
}

#[allow(dead_code)]
#[derive(Deserialize)]
struct VramInfo {
    device_index: u32,
    vram_used_gb: f32,
    vram_total_gb: f32,
    vram_utilization_percent: f32,
}

#[allow(dead_code)]
#[derive(Deserialize)]
struct ProcessStats {
    pid: u32,
    group: String,
    instance: String,
    cpu_pct: f64,
    rss_mb: u64,
    gpu_util_pct: f64,
    vram_mb: u64,
    model: Option<String>,
    uptime_s: u64,
    io_r_mb_s: f64,
    io_w_mb_s: f64,
}

#[test]
fn a_reference_consumer_parses_our_heartbeats() {
    if !bpf_available("reference_shape") {
        return;
    }
    let cg = TestCgroup::new("reference_shape");
    let on_gpu = cg.mkdir("rbee.slice/llm/8080");
    let off_gpu = cg.mkdir("rbee.slice/embed/9090");
    let llm = Workload::start(HM_LOAD, &on_gpu, &["sleep", "60", "--model", "llama-3.2-1b"]);
    let _embed = Workload::start(HM_LOAD, &off_gpu, &["sleep", "60"]);
    let scenario = std::env::temp_dir().join(format!("hm-reference-shape-{}.json", std::process::id()));
    let gib = 1u64 << 30;
    let device = serde_json::json!({
        "name": "Stub GPU 0", "uuid": "GPU-0", "memory_total": 80 * gib, "memory_used": 10 * gib,
        "utilization_gpu": 40, "utilization_memory": 5, "temperature": 50,
        "compute": [{ "pid": llm.pid(), "used_memory": 2 * gib }], "graphics": [],
        "samples": [{ "pid": llm.pid(), "sm_util": 40, "timestamp": 1 }]
    });
    std::fs::write(&scenario, serde_json::json!({ "devices": [device] }).to_string()).unwrap();
    let root = cg.root.to_string_lossy().into_owned();
    let out = Command::new(DAEMON)
        .args(["run", "--cgroup-root", &root, "--slice", &cg.rel("rbee.slice"), "--interval", "300ms"])
        .args(["--count", "4", "--nvml-lib", nvml_stub().to_str().unwrap()])
        .env("NVML_STUB_SCENARIO", &scenario)
        .stdin(Stdio::null())
        .output()
        .expect("run hive-monitor");
    let _ = std::fs::remove_file(&scenario);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));

    let beats: Vec<HiveHeartbeat> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("reference shape: {e}\n{l}")))
        .collect();
    assert_eq!(beats.len(), 4);
    let last = beats.last().unwrap();
    assert_eq!(last.hive.vram_per_device.len(), 1);
    let llm_stats = last.workers.iter().find(|w| &*w.instance == "8080").unwrap();
    assert_eq!((llm_stats.pid, llm_stats.vram_mb), (llm.pid(), 2048));
    assert_eq!(llm_stats.model.as_deref(), Some("llama-3.2-1b"));
    // The queen's idle filter, over the interval with the stub's one utilisation sample: the
    // embedding worker uses no GPU.
    let idle: Vec<_> =
        beats[0].workers.iter().filter(|w| w.gpu_util_pct == 0.0).map(|w| &w.instance).collect();
    assert_eq!(idle, ["9090"]);
}
