//! The `hive-monitor` binary end to end: heartbeats on standard output from the real probes,
//! workers coming and going, and clear errors for bad input and missing privilege.
use std::{
    process::{Command, Output, Stdio},
    time::Duration,
};

use hive_monitor_tests::*;
use monitor_user::{sampler::Sampler, sources::cgroup::Slice};
use serde_json::Value;

const HM_LOAD: &str = env!("CARGO_BIN_EXE_hm-load");
/// `hive-monitor`'s command line, built in this package (`src/bin/hm-daemon.rs`).
const DAEMON: &str = env!("CARGO_BIN_EXE_hm-daemon");

const REFERENCE_HIVE: [&str; 11] = [
    "id",
    "hostname",
    "port",
    "operational_status",
    "health_status",
    "version",
    "cpu_usage_percent",
    "ram_used_gb",
    "ram_total_gb",
    "vram_per_device",
    "uptime_seconds",
];
const REFERENCE_WORKER: [&str; 11] = [
    "pid",
    "group",
    "instance",
    "cpu_pct",
    "rss_mb",
    "gpu_util_pct",
    "vram_mb",
    "model",
    "uptime_s",
    "io_r_mb_s",
    "io_w_mb_s",
];
/// Reference fields this version does not collect yet: they must be null, never 0.
const NOT_COLLECTED: [&str; 4] = ["gpu_util_pct", "vram_mb", "io_r_mb_s", "io_w_mb_s"];

fn daemon(args: &[&str]) -> Output {
    Command::new(DAEMON).args(args).stdin(Stdio::null()).output().expect("run hive-monitor")
}

#[test]
fn run_prints_one_heartbeat_per_interval() {
    if !bpf_available("run_prints_one_heartbeat_per_interval") {
        return;
    }
    let cg = TestCgroup::new("daemon");
    let busy_dir = cg.mkdir("rbee.slice/llm/8080");
    let idle_dir = cg.mkdir("rbee.slice/embed/9090");
    let busy = Workload::start(HM_LOAD, &busy_dir, &["busy", "1", "60"]);
    let idle = Workload::start(HM_LOAD, &idle_dir, &["sleep", "60", "--model", "tiny-embed"]);
    let root = cg.root.to_string_lossy().into_owned();
    let out = daemon(&[
        "run",
        "--cgroup-root",
        &root,
        "--slice",
        &cg.rel("rbee.slice"),
        "--interval",
        "300ms",
        "--count",
        "3",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "exit {:?}\nstderr: {}", out.status, String::from_utf8_lossy(&out.stderr));

    let beats: Vec<Value> =
        stdout.lines().map(|l| serde_json::from_str(l).expect("a JSON object per line")).collect();
    assert_eq!(beats.len(), 3, "{stdout}");
    for (i, hb) in beats.iter().enumerate() {
        assert_eq!(hb["schema_version"], 1);
        assert_eq!(hb["seq"], i as u64 + 1);
        let interval = hb["interval_ms"].as_f64().expect("interval_ms");
        assert!((200.0..600.0).contains(&interval), "interval_ms {interval}");
        humantime::parse_rfc3339(hb["timestamp"].as_str().expect("timestamp")).expect("RFC 3339 timestamp");
        for key in REFERENCE_HIVE {
            assert!(hb["hive"].get(key).is_some(), "hive.{key} missing: {hb}");
        }
        assert_eq!(hb["collector"]["cpu"], "ebpf");
        let workers = hb["workers"].as_array().expect("workers");
        assert_eq!(workers.len(), 2, "{hb}");
        for w in workers {
            for key in REFERENCE_WORKER {
                assert!(w.get(key).is_some(), "worker.{key} missing: {w}");
            }
            for key in NOT_COLLECTED {
                assert!(w[key].is_null(), "worker.{key} is not collected yet, so must be null: {w}");
            }
        }
    }
    let last = &beats[2]["workers"];
    let find =
        |instance: &str| last.as_array().unwrap().iter().find(|w| w["instance"] == instance).unwrap().clone();
    let (b, i) = (find("8080"), find("9090"));
    assert_eq!((b["group"].as_str(), b["pid"].as_u64()), (Some("llm"), Some(busy.pid() as u64)));
    assert_eq!((i["group"].as_str(), i["pid"].as_u64()), (Some("embed"), Some(idle.pid() as u64)));
    assert!(b["cpu_pct"].as_f64().unwrap() > 50.0, "busy worker: {b}");
    assert_eq!(i["model"], "tiny-embed", "read from the command line: {i}");
    assert!(b["model"].is_null(), "a command line without a model names none: {b}");
    assert!(b["rss_mb"].as_u64().is_some() && b["memory"]["current_bytes"].as_u64().unwrap() > 0, "{b}");
    let hive = &beats[2]["hive"];
    assert!(
        hive["ram_total_gb"].as_f64().unwrap() > 0.0 && hive["cpu_usage_percent"].as_f64().is_some(),
        "{hive}"
    );
    assert!(i["cpu_pct"].as_f64().unwrap() < 5.0, "idle worker: {i}");
    assert!(b["cpu_ns_total"].as_u64().unwrap() > 0);
}

/// SPEC §7: a new worker is in the next heartbeat, an exited one gone from the next.
#[test]
fn workers_come_and_go_between_samples() {
    if !bpf_available("workers_come_and_go_between_samples") {
        return;
    }
    let cg = TestCgroup::new("churn");
    cg.mkdir("rbee.slice");
    let slice = Slice::new(&cg.root, &cg.rel("rbee.slice")).expect("slice");
    let mut sampler = Sampler::new(slice).expect("sampler");
    assert!(sampler.sample().expect("sample").workers.is_empty());

    let dir = cg.mkdir("rbee.slice/llm/8080");
    let load = Workload::start(HM_LOAD, &dir, &["busy", "1", "60"]);
    std::thread::sleep(Duration::from_millis(300));
    let sample = sampler.sample().expect("sample");
    assert_eq!(sample.workers.len(), 1);
    assert_eq!(sample.workers[0].pid, Some(load.pid()));
    assert!(sample.workers[0].cpu_pct.unwrap() > 20.0, "{:?}", sample.workers[0]);

    drop(load);
    std::fs::remove_dir(&dir).expect("rmdir worker");
    let sample = sampler.sample().expect("sample");
    assert!(sample.workers.is_empty(), "{:?}", sample.workers);
}

#[test]
fn bad_arguments_are_clear_errors() {
    let out = daemon(&["run", "--interval", "0s"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("outside 10ms..1h"), "{out:?}");

    let out = daemon(&["run", "--interval", "soon"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("examples: 1s, 500ms"), "{out:?}");

    for slice in ["../escape", "/abs", "a//b", "rbee.slice/"] {
        let out = daemon(&["run", "--slice", slice]);
        assert_eq!(out.status.code(), Some(1), "{slice}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("invalid slice path"), "{slice}: {out:?}");
    }

    let out = daemon(&["run", "--cgroup-root", "/proc"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/proc is not a cgroup2 directory"), "{out:?}");
}

/// Without CAP_BPF/CAP_PERFMON the daemon names what is missing instead of failing in a
/// load call. As root, the capabilities are dropped for the child with setpriv.
#[test]
fn unprivileged_run_names_the_missing_capabilities() {
    let out = if unsafe { libc::geteuid() } == 0 {
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
                DAEMON,
                "run",
                "--count",
                "1",
            ])
            .output()
            .expect("setpriv (util-linux)")
    } else {
        daemon(&["run", "--count", "1"])
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("needs CAP_BPF and CAP_PERFMON (or root)"), "{stderr}");
    assert!(out.stdout.is_empty(), "no heartbeat without probes");
}
