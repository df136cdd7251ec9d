//! rbee's side of the heartbeat stream: a consumer typed exactly as today's queen-rbee
//! (`ProcessStats` with non-optional numbers, events as an enum tagged on `type`) parses
//! every worker of every event, with probes, without them, without NVML and with the NVML
//! stub's two GPUs. Fifty subscribers and one that never reads; the ready callback, sent
//! only while no one subscribes; the reference coordinator across restarts of either side.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hive_monitor_tests::*;
use serde::Deserialize;
use serde_json::{json, Value};

const DAEMON: &str = env!("CARGO_BIN_EXE_hm-daemon");
const HM_LOAD: &str = env!("CARGO_BIN_EXE_hm-load");
const GIB: u64 = 1 << 30;

/// rbee's `ProcessStats` (hive-contract `telemetry.rs`), field for field.
#[allow(dead_code)]
#[derive(Debug, Deserialize)]
struct ProcessStats {
    pid: u32,
    group: String,
    instance: String,
    cpu_pct: f64,
    rss_mb: u64,
    io_r_mb_s: f64,
    io_w_mb_s: f64,
    uptime_s: u64,
    gpu_util_pct: f64,
    vram_mb: u64,
    total_vram_mb: u64,
    model: Option<String>,
}

/// queen-rbee's `HiveHeartbeatEvent` (`hive_subscriber.rs`).
#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum HiveHeartbeatEvent {
    Telemetry {
        hive_id: String,
        #[serde(rename = "hive_info")]
        _hive_info: Value,
        timestamp: String,
        workers: Vec<Value>,
    },
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn daemon(cg: &TestCgroup, port: u16, extra: &[&str], env: &[(&str, &std::path::Path)]) -> Killed {
    let root = cg.root.to_string_lossy().into_owned();
    let mut cmd = Command::new(DAEMON);
    cmd.args(["run", "--cgroup-root", &root, "--slice", &cg.rel("rbee.slice"), "--interval", "300ms"])
        .args(["--listen", &format!("127.0.0.1:{port}"), "--hive-id", "hive-s"])
        .args(extra)
        .stdout(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = Killed(cmd.spawn().expect("start the daemon"));
    let client = client();
    wait_for(
        || {
            client
                .get(format!("http://127.0.0.1:{port}/v1/heartbeat"))
                .send()
                .is_ok_and(|r| r.status() == 200)
        },
        Duration::from_secs(20),
        "the daemon's first heartbeat",
    );
    child
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().timeout(Duration::from_secs(60)).build().unwrap()
}

/// The events of one subscription: (`id`, `data`) as the SSE wire carries them.
struct Events(std::io::Lines<BufReader<reqwest::blocking::Response>>);

fn subscribe(port: u16) -> Events {
    let r = client().get(format!("http://127.0.0.1:{port}/v1/heartbeats/stream")).send().expect("subscribe");
    assert_eq!(r.status(), 200);
    let kind = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(kind.starts_with("text/event-stream"), "{kind}");
    Events(BufReader::new(r).lines())
}

impl Iterator for Events {
    type Item = (u64, String);

    fn next(&mut self) -> Option<Self::Item> {
        let (mut id, mut data) = (None, None);
        for line in self.0.by_ref() {
            let line = line.ok()?;
            if let Some(v) = line.strip_prefix("id:") {
                id = v.trim().parse().ok();
            } else if let Some(v) = line.strip_prefix("data:") {
                data = Some(v.trim_start().to_string());
            } else if line.is_empty() {
                if let (Some(id), Some(data)) = (id, data.take()) {
                    return Some((id, data));
                }
            }
        }
        None
    }
}

/// Reads `n` events and parses each as the queen does; every worker must parse.
fn strict_events(port: u16, n: usize) -> Vec<Value> {
    let mut events = subscribe(port);
    let mut out = Vec::new();
    let mut last = None;
    for _ in 0..n {
        let (id, data) = events.next().expect("an event");
        if let Some(last) = last {
            assert_eq!(id, last + 1, "events follow each other with no gap");
        }
        last = Some(id);
        let HiveHeartbeatEvent::Telemetry { hive_id, workers, timestamp, .. } = serde_json::from_str(&data)
            .unwrap_or_else(|e| panic!("the queen would drop this event ({e}): {data}"));
        assert_eq!(hive_id, "hive-s");
        humantime::parse_rfc3339(&timestamp).expect("an RFC 3339 timestamp");
        for w in &workers {
            if let Err(e) = serde_json::from_value::<ProcessStats>(w.clone()) {
                panic!("the queen would drop this worker ({e}): {w}");
            }
        }
        out.push(serde_json::from_str(&data).unwrap());
    }
    out
}

fn worker<'a>(event: &'a Value, instance: &str) -> &'a Value {
    event["workers"].as_array().unwrap().iter().find(|w| w["instance"] == instance).expect("the worker")
}

fn unknown(w: &Value) -> Vec<&str> {
    w["unknown"].as_array().unwrap().iter().map(|u| u.as_str().unwrap()).collect()
}

/// Workers llm/8080 (a process naming a model) and embed/9090 (empty).
fn workers(name: &str) -> (TestCgroup, Workload) {
    let cg = TestCgroup::new(name);
    let llm = cg.mkdir("rbee.slice/llm/8080");
    cg.mkdir("rbee.slice/embed/9090");
    let load = Workload::start(HM_LOAD, &llm, &["duty", "20", "100", "60", "--model", "tiny-llama"]);
    (cg, load)
}

#[test]
fn every_worker_of_every_event_parses_as_the_queen_types_it() {
    if !bpf_available("stream_strict") {
        return;
    }
    let driver = std::path::Path::new("/proc/driver/nvidia").exists();
    let scenario = std::env::temp_dir().join(format!("nvml-stream-{}.json", std::process::id()));
    for (config, extra) in [("probes", &[][..]), ("no-bpf", &["--no-bpf"][..]), ("nvml-stub", &[][..])] {
        let (cg, load) = workers(&format!("stream_{config}"));
        let stub = nvml_stub();
        let mut args: Vec<&str> = extra.to_vec();
        let mut env = Vec::new();
        if config == "nvml-stub" {
            std::fs::write(
                &scenario,
                json!({ "devices": [
                gpu(0, 8 * GIB, json!([])),
                gpu(1, 16 * GIB, json!([{ "pid": load.pid(), "used_memory": GIB }])),
            ] })
                .to_string(),
            )
            .unwrap();
            args.extend(["--nvml-lib", stub.to_str().unwrap()]);
            env.push(("NVML_STUB_SCENARIO", scenario.as_path()));
        }
        let port = free_port();
        let _d = daemon(&cg, port, &args, &env);
        let events = strict_events(port, 4);
        let last = events.last().unwrap();
        let (llm, empty) = (worker(last, "8080"), worker(last, "9090"));
        eprintln!("stream {config}: {llm}");
        assert_eq!(llm["pid"], load.pid(), "{config}");
        assert_eq!(llm["model"], "tiny-llama", "{config}");
        assert!(!unknown(llm).contains(&"cpu_pct"), "{config}: CPU is measured: {llm}");
        assert!(llm["cpu_pct"].as_f64().unwrap() > 0.0, "{config}: a working worker uses CPU: {llm}");
        assert_eq!(
            (empty["pid"].as_u64(), unknown(empty).contains(&"pid")),
            (Some(0), true),
            "{config}: {empty}"
        );
        match config {
            "nvml-stub" => {
                assert_eq!(
                    (llm["vram_mb"].as_u64(), llm["total_vram_mb"].as_u64()),
                    (Some(1024), Some(16 * 1024))
                );
                assert_eq!(llm["gpu_devices"], json!([1]));
                assert_eq!(empty["total_vram_mb"], 24 * 1024, "on no device: every device's VRAM");
                assert!(!unknown(llm).iter().any(|u| u.contains("vram")), "{llm}");
            }
            // Without NVML: a host without an NVIDIA driver has no GPU, a known zero.
            _ if !driver => {
                for w in [llm, empty] {
                    assert_eq!(
                        (w["gpu_util_pct"].as_f64(), w["vram_mb"].as_u64(), w["total_vram_mb"].as_u64()),
                        (Some(0.0), Some(0), Some(0))
                    );
                    assert!(!unknown(w).iter().any(|u| u.contains("gpu") || u.contains("vram")), "{w}");
                }
            }
            _ => assert!(unknown(llm).contains(&"total_vram_mb"), "a driver but no NVML: unknown: {llm}"),
        }
    }
    let _ = std::fs::remove_file(&scenario);
}

fn gpu(index: u32, total: u64, compute: Value) -> Value {
    json!({ "name": format!("Stub GPU {index}"), "uuid": format!("GPU-{index}"), "memory_total": total,
            "memory_used": GIB, "utilization_gpu": 10, "utilization_memory": 5, "temperature": 40,
            "compute": compute, "graphics": [], "samples": [] })
}

fn latest_heartbeat(port: u16) -> Value {
    client().get(format!("http://127.0.0.1:{port}/v1/heartbeat")).send().unwrap().json().unwrap()
}

/// A subscriber that stops reading delays neither sampling nor the others, who see every
/// event; `collector.stream_subscribers` counts them all.
#[test]
fn fifty_subscribers_and_one_that_never_reads() {
    if !bpf_available("stream_fanout") {
        return;
    }
    let (cg, _load) = workers("stream_fanout");
    let port = free_port();
    let _d = daemon(&cg, port, &[], &[]);
    let mut stuck = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(stuck, "GET /v1/heartbeats/stream HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let before = latest_heartbeat(port)["seq"].as_u64().unwrap();
    let started = Instant::now();
    let readers: Vec<_> = (0..50)
        .map(|_| {
            std::thread::spawn(move || {
                let mut events = subscribe(port);
                let first = events.next().expect("the latest heartbeat, at once").0;
                let mut ids = vec![first];
                while ids.len() < 16 {
                    ids.push(events.next().expect("an event").0);
                }
                ids
            })
        })
        .collect();
    wait_for(
        || latest_heartbeat(port)["collector"]["stream_subscribers"] == 51,
        Duration::from_secs(10),
        "51 subscribers in the heartbeat",
    );
    for r in readers {
        let ids = r.join().unwrap();
        assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "every event, in order: {ids:?}");
    }
    let elapsed = started.elapsed();
    let after = latest_heartbeat(port)["seq"].as_u64().unwrap();
    let nominal = elapsed.as_secs_f64() / 0.3;
    eprintln!("stream fan-out: {} heartbeats in {elapsed:?} (nominal {nominal:.1})", after - before);
    assert!((after - before) as f64 >= nominal * 0.5, "sampling fell behind its 300 ms cadence");
    drop(stuck);
}

/// A stand-in queen that records every `POST /v1/hive/ready` body and answers 200.
/// Each `ready` body the fake queen got, and when.
type Calls = Arc<Mutex<Vec<(Instant, Value)>>>;

fn fake_queen() -> (u16, Calls) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&calls);
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let (mut head, mut len) = (String::new(), 0);
            while reader.read_line(&mut head).is_ok_and(|n| n > 2) {
                if let Some(v) = head
                    .lines()
                    .last()
                    .and_then(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(str::to_string))
                {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; len];
            if reader.read_exact(&mut body).is_err() {
                continue;
            }
            if head.starts_with("POST /v1/hive/ready ") {
                seen.lock()
                    .unwrap()
                    .push((Instant::now(), serde_json::from_slice(&body).unwrap_or(Value::Null)));
            }
            let _ = (&conn).write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}");
        }
    });
    (port, calls)
}

/// The daemon announces itself once; never while a subscriber stays connected; and again
/// once no one has subscribed for longer than the queen's 5 s reconnect period.
#[test]
fn announces_only_while_no_one_subscribes() {
    if !bpf_available("stream_ready") {
        return;
    }
    let (cg, _load) = workers("stream_ready");
    let (queen, calls) = fake_queen();
    let port = free_port();
    let base = format!("http://127.0.0.1:{queen}/");
    let advertised = format!("http://127.0.0.1:{port}/");
    let _d = daemon(&cg, port, &["--coordinator", &base, "--advertise-url", &advertised], &[]);
    wait_for(|| !calls.lock().unwrap().is_empty(), Duration::from_secs(20), "the first announcement");
    let first = calls.lock().unwrap()[0].1.clone();
    assert_eq!(
        first,
        json!({ "hive_id": "hive-s", "hive_url": format!("http://127.0.0.1:{port}") }),
        "no trailing /"
    );

    let mut events = subscribe(port);
    let held = Instant::now();
    while held.elapsed() < Duration::from_secs(12) {
        events.next().expect("an event");
    }
    assert_eq!(calls.lock().unwrap().len(), 1, "announced again while subscribed");
    drop(events);
    let dropped = Instant::now();
    wait_for(
        || calls.lock().unwrap().len() == 2,
        Duration::from_secs(20),
        "an announcement after the subscriber left",
    );
    let again = calls.lock().unwrap()[1].0.duration_since(dropped);
    eprintln!("stream ready: announced again {again:?} after the subscriber left");
    assert!(again > Duration::from_secs(5), "announced within the queen's reconnect period: {again:?}");
}

fn queen(port: u16) -> Killed {
    let child = Command::new(DAEMON)
        .args(["coordinator", "--listen", &format!("127.0.0.1:{port}")])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let client = client();
    wait_for(
        || client.get(format!("http://127.0.0.1:{port}/v1/hives")).send().is_ok(),
        Duration::from_secs(10),
        "the coordinator",
    );
    Killed(child)
}

fn instances(port: u16) -> Vec<String> {
    let v: Value =
        match client().get(format!("http://127.0.0.1:{port}/v1/workers")).send().and_then(|r| r.json()) {
            Ok(v) => v,
            Err(_) => return Vec::new(),
        };
    v.as_array().into_iter().flatten().filter_map(|w| w["instance"].as_str().map(String::from)).collect()
}

/// Stream mode against the reference coordinator: the worker shows at the coordinator; a
/// restarted coordinator gets the hive back within 15 s; a stream that drops (the daemon
/// restarted) removes the hive at once, and the coordinator's reconnect brings it back.
#[test]
fn the_reference_coordinator_follows_the_stream_across_restarts() {
    if !bpf_available("stream_queen") {
        return;
    }
    let (cg, _load) = workers("stream_queen");
    let (qport, port) = (free_port(), free_port());
    let mut q = queen(qport);
    let base = format!("http://127.0.0.1:{qport}");
    let mut d = daemon(&cg, port, &["--coordinator", &base], &[]);
    let start = Instant::now();
    wait_for(
        || instances(qport).contains(&"8080".to_string()),
        Duration::from_secs(20),
        "the worker at the coordinator",
    );
    eprintln!(
        "stream queen: worker at the coordinator {:?} after the daemon's first heartbeat",
        start.elapsed()
    );
    let hives: Value = client().get(format!("{base}/v1/hives")).send().unwrap().json().unwrap();
    assert_eq!((hives[0]["id"].as_str(), hives[0]["protocol"].as_str()), (Some("hive-s"), Some("stream")));
    let idle: Value = client()
        .get(format!("{base}/v1/workers?idle=false&model=tiny-llama"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(idle[0]["instance"], "8080", "a working worker on a host without GPU is busy: {idle}");

    drop(q);
    q = queen(qport);
    let restarted = Instant::now();
    wait_for(
        || instances(qport).contains(&"8080".to_string()),
        Duration::from_secs(20),
        "the worker after the coordinator restarted",
    );
    let back = restarted.elapsed();
    eprintln!("stream queen: worker back {back:?} after the coordinator restarted");
    assert!(back < Duration::from_secs(15), "{back:?}");

    drop(d);
    let stopped = Instant::now();
    wait_for(
        || instances(qport).is_empty(),
        Duration::from_secs(5),
        "the hive removed when its stream closed",
    );
    eprintln!("stream queen: hive removed {:?} after its stream closed", stopped.elapsed());
    d = daemon(&cg, port, &["--coordinator", &base], &[]);
    wait_for(
        || instances(qport).contains(&"8080".to_string()),
        Duration::from_secs(15),
        "the hive back after its stream reopened",
    );
    drop((d, q));
}
