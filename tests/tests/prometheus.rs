//! `/metrics` as Prometheus itself takes it: Debian's `promtool check metrics` finds nothing
//! to say about the daemon's real output, and a real `prometheus` server scraping it every
//! second computes from it, with PromQL `rate()`, the worker's CPU as the worker cgroup's
//! `cpu.stat` counts it, keeps the worker's labels as they are, and marks a removed worker's
//! series stale.
use std::{
    collections::BTreeSet,
    io::Write,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use hive_monitor_tests::*;
use serde_json::Value;

const DAEMON: &str = env!("CARGO_BIN_EXE_hm-daemon");
const HM_LOAD: &str = env!("CARGO_BIN_EXE_hm-load");

/// Kills and reaps a process this test started.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("hm-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn daemon(cg: &TestCgroup, port: u16, interval: &str) -> Running {
    let root = cg.root.to_string_lossy().into_owned();
    Running(
        Command::new(DAEMON)
            .args(["run", "--cgroup-root", &root, "--slice", &cg.rel("rbee.slice"), "--interval", interval])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .spawn()
            .expect("start the daemon"),
    )
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().timeout(Duration::from_secs(5)).build().unwrap()
}

/// The daemon's `/metrics` as a plain client gets it, once the workers are in it.
fn scrape(port: u16, workers: usize) -> String {
    let c = client();
    let mut text = String::new();
    wait_for(
        || {
            let r =
                c.get(format!("http://127.0.0.1:{port}/metrics")).send().and_then(|r| r.error_for_status());
            text = r.and_then(|r| r.text()).unwrap_or_default();
            text.matches("hive_worker_cpu_seconds_total{").count() >= workers
                && text.contains("hive_worker_pressure_stall_ratio{")
        },
        Duration::from_secs(20),
        "the workers' series on /metrics",
    );
    text
}

#[test]
fn promtool_finds_nothing_to_say_about_the_metrics() {
    let Some(promtool) = tool("promtool_check_metrics", "promtool") else { return };
    if !bpf_available("promtool_check_metrics") {
        return;
    }
    let cg = TestCgroup::new("promlint");
    let busy = cg.mkdir("rbee.slice/llm/8080");
    let idle = cg.mkdir("rbee.slice/embed/9090");
    let _busy = Workload::start(HM_LOAD, &busy, &["busy", "1", "60", "--model", "llama-3.2-1b"]);
    let _idle = Workload::start(HM_LOAD, &idle, &["sleep", "60"]);
    let port = free_port();
    let _daemon = daemon(&cg, port, "300ms");
    let text = scrape(port, 2);

    promtool_says_nothing(&promtool, &text);

    let scrape =
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("text format");
    let labels: BTreeSet<&str> =
        scrape.samples.iter().flat_map(|s| s.labels.keys().map(String::as_str)).collect();
    assert!(
        !labels.contains("instance") && !labels.contains("job"),
        "labels Prometheus attaches itself: {labels:?}"
    );
    let names: BTreeSet<&str> = scrape.samples.iter().map(|s| s.metric.as_str()).collect();
    let of = |worker: &str, name: &str| {
        scrape.samples.iter().filter(|s| s.metric == name && s.labels.get("worker") == Some(worker)).count()
    };
    // Per worker: one series per figure, or per level/direction, kind, resource.
    for (name, each) in [
        ("hive_worker_cpu_seconds_total", 1),
        ("hive_worker_cpu_usage_ratio", 1),
        ("hive_worker_runq_wait_seconds_total", 1),
        ("hive_worker_runq_wait_ratio", 1),
        ("hive_worker_runq_waits_total", 1),
        ("hive_worker_context_switches_total", 2),
        ("hive_worker_io_bytes_total", 4),
        ("hive_worker_io_bytes_per_second", 4),
        ("hive_worker_processes", 1),
        ("hive_worker_processes_forked_total", 1),
        ("hive_worker_execs_total", 1),
        ("hive_worker_processes_exited_total", 1),
        ("hive_worker_memory_usage_bytes", 1),
        ("hive_worker_main_pid", 1),
        ("hive_worker_uptime_seconds", 1),
        ("hive_worker_info", 1),
    ] {
        for worker in ["8080", "9090"] {
            assert_eq!(of(worker, name), each, "{name} for worker {worker}:\n{text}");
        }
    }
    // Every pressure file present is a series (a CPU `full` line may be absent).
    let dir_has = |dir: &Path, r: &str, kind: &str| {
        std::fs::read_to_string(dir.join(format!("{r}.pressure")))
            .is_ok_and(|t| t.contains(&format!("{kind} ")))
    };
    let expected: usize = ["cpu", "memory", "io"]
        .iter()
        .flat_map(|r| ["some", "full"].map(|k| (r, k)))
        .filter(|(r, k)| dir_has(&busy, r, k))
        .count();
    assert!(expected > 0, "no pressure files in {}", busy.display());
    assert_eq!(of("8080", "hive_worker_pressure_stalled_seconds_total"), expected, "{text}");
    let info = scrape
        .samples
        .iter()
        .find(|s| s.metric == "hive_worker_info" && s.labels.get("worker") == Some("8080"))
        .unwrap();
    assert_eq!(info.labels.get("group"), Some("llm"));
    wait_for(
        || scrape_text(port).contains("model=\"llama-3.2-1b\""),
        Duration::from_secs(10),
        "the model name on hive_worker_info",
    );
    for name in [
        "hive_info",
        "hive_heartbeats_total",
        "hive_heartbeat_timestamp_seconds",
        "hive_host_cpu_usage_ratio",
        "hive_host_ram_used_bytes",
        "hive_host_ram_total_bytes",
        "hive_probe_lost_events_total",
        "hive_self_cpu_seconds_total",
        "hive_self_resident_memory_bytes",
    ] {
        assert!(names.contains(name), "{name} missing:\n{text}");
    }
    assert!(!text.contains("gigabytes"), "not in base units:\n{text}");
    // No NVML here: the GPU figures are null, so there are no GPU series (not zeros).
    assert!(!names.iter().any(|n| n.contains("gpu")), "GPU series without a GPU source:\n{text}");
}

/// `promtool check metrics` on `text` exits 0 and prints nothing.
fn promtool_says_nothing(promtool: &Path, text: &str) {
    let mut check = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.is_empty(), "promtool check metrics: {said}\non:\n{text}");
}

/// With GPUs (the scripted NVML library): the device and per-worker GPU series are there,
/// in bytes and ratios of what the driver reported, and promtool has nothing to say.
#[test]
fn gpu_series_in_base_units() {
    const GIB: u64 = 1 << 30;
    let Some(promtool) = tool("promtool_gpu_metrics", "promtool") else { return };
    if !bpf_available("promtool_gpu_metrics") {
        return;
    }
    let cg = TestCgroup::new("promgpu");
    let dir = cg.mkdir("rbee.slice/llm/8080");
    let load = Workload::start(HM_LOAD, &dir, &["sleep", "60"]);
    let scenario = TempDir::new("promgpu");
    let file = scenario.0.join("scenario.json");
    std::fs::write(
        &file,
        serde_json::json!({ "devices": [{
            "name": "Stub GPU 0", "uuid": "GPU-0", "memory_total": 80 * GIB, "memory_used": 10 * GIB,
            "utilization_gpu": 90, "utilization_memory": 5, "temperature": 61,
            "compute": [{ "pid": load.pid(), "used_memory": 3 * GIB }], "graphics": [], "samples": [] }] })
        .to_string(),
    )
    .unwrap();
    let port = free_port();
    let root = cg.root.to_string_lossy().into_owned();
    let _daemon = Running(
        Command::new(DAEMON)
            .args(["run", "--cgroup-root", &root, "--slice", &cg.rel("rbee.slice"), "--interval", "300ms"])
            .args(["--listen", &format!("127.0.0.1:{port}"), "--nvml-lib", nvml_stub().to_str().unwrap()])
            .env("NVML_STUB_SCENARIO", &file)
            .stdout(Stdio::null())
            .spawn()
            .expect("start the daemon"),
    );
    let text = scrape(port, 1);
    promtool_says_nothing(&promtool, &text);
    let scrape =
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("text format");
    let get = |name: &str| {
        let s = scrape.samples.iter().find(|s| s.metric == name).unwrap_or_else(|| panic!("{name}:\n{text}"));
        match s.value {
            prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
            ref v => panic!("{name}: {v:?}"),
        }
    };
    assert_eq!(get("hive_gpu_memory_total_bytes"), (80 * GIB) as f64);
    assert_eq!(get("hive_gpu_memory_used_bytes"), (10 * GIB) as f64);
    assert_eq!(get("hive_gpu_utilization_ratio"), 0.9);
    assert_eq!(get("hive_gpu_temperature_celsius"), 61.0);
    assert_eq!(get("hive_worker_gpu_memory_bytes"), (3 * GIB) as f64);
    assert_eq!(get("hive_worker_gpu_device_memory_bytes"), (3 * GIB) as f64);
}

fn scrape_text(port: u16) -> String {
    client().get(format!("http://127.0.0.1:{port}/metrics")).send().and_then(|r| r.text()).unwrap_or_default()
}

/// A Prometheus server on loopback with its own data directory, scraping the daemon.
struct Server {
    _process: Running,
    base: String,
    _dir: TempDir,
}

impl Server {
    fn start(prometheus: &Path, target: u16) -> Self {
        let dir = TempDir::new("prometheus");
        let config = dir.0.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: hive\n    static_configs:\n      - targets: ['127.0.0.1:{target}']\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let process = Running(
            Command::new(prometheus)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!("--storage.tsdb.path={}", dir.0.join("data").display()))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg("--log.level=warn")
                .stdout(Stdio::null())
                .spawn()
                .expect("start prometheus"),
        );
        let base = format!("http://127.0.0.1:{port}");
        let c = client();
        wait_for(
            || c.get(format!("{base}/-/ready")).send().is_ok_and(|r| r.status().is_success()),
            Duration::from_secs(30),
            "prometheus to be ready",
        );
        Self { _process: process, base, _dir: dir }
    }

    /// The result of a PromQL query, evaluated at `at` (Unix seconds) or now.
    fn query(&self, promql: &str, at: Option<f64>) -> Vec<Value> {
        let mut url = format!("{}/api/v1/query?query={}", self.base, encode(promql));
        if let Some(t) = at {
            url += &format!("&time={t:.3}");
        }
        let body: Value = client().get(&url).send().and_then(|r| r.json()).expect("query answered");
        assert_eq!(body["status"], "success", "{promql}: {body}");
        body["data"]["result"].as_array().cloned().unwrap_or_default()
    }
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn value(v: &Value) -> f64 {
    v[1].as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("a sample value: {v}"))
}

const CPU: &str = "hive_worker_cpu_seconds_total{group=\"llm\",worker=\"8080\"}";

/// With the worker frozen: the daemon's CPU counter for it once two heartbeats agree (it
/// stands still from then on), after Prometheus has scraped it; and `cpu.stat`'s, seconds.
fn plateau(server: &Server, daemon: u16, dir: &Path) -> (f64, f64) {
    let kernel = cpu_stat_ns(dir) as f64 / 1e9;
    let c = client();
    let mut last: Option<(u64, u64)> = None;
    let mut counter = 0;
    wait_for(
        || {
            let hb: Value = match c
                .get(format!("http://127.0.0.1:{daemon}/v1/heartbeat"))
                .send()
                .and_then(|r| r.json())
            {
                Ok(hb) => hb,
                Err(_) => return false,
            };
            let seq = hb["seq"].as_u64().unwrap_or(0);
            let Some(ns) = hb["workers"]
                .as_array()
                .and_then(|ws| ws.iter().find(|w| w["instance"] == "8080"))
                .and_then(|w| w["cpu_ns_total"].as_u64())
            else {
                return false;
            };
            let steady = last.is_some_and(|(s, n)| s != seq && n == ns);
            last = Some((seq, ns));
            counter = ns;
            steady
        },
        Duration::from_secs(30),
        "two heartbeats of the frozen worker",
    );
    let counter = counter as f64 / 1e9;
    wait_for(
        || server.query(CPU, None).first().is_some_and(|r| (value(&r["value"]) - counter).abs() < 1e-9),
        Duration::from_secs(30),
        "a scrape of the frozen worker's CPU counter",
    );
    (counter, kernel)
}

#[test]
fn a_real_prometheus_computes_cpu_from_the_counter_as_cpu_stat_does() {
    let Some(prometheus) = tool("real_prometheus", "prometheus") else { return };
    if !bpf_available("real_prometheus") {
        return;
    }
    let cg = TestCgroup::new("realprom");
    let dir = cg.mkdir("rbee.slice/llm/8080");
    let other = cg.mkdir("rbee.slice/embed/9090");
    let load = Workload::start(HM_LOAD, &dir, &["duty", "50", "20", "120"]);
    let _other = Workload::start(HM_LOAD, &other, &["sleep", "120"]);
    let port = free_port();
    let _daemon = daemon(&cg, port, "1s");
    scrape(port, 2);
    let server = Server::start(&prometheus, port);

    // The worker's labels arrive as the daemon wrote them; the scrape's own are beside them.
    wait_for(|| !server.query(CPU, None).is_empty(), Duration::from_secs(30), "the first scrape");
    let labels = &server.query(CPU, None)[0]["metric"];
    assert_eq!(labels["instance"], format!("127.0.0.1:{port}"), "{labels}");
    assert_eq!(labels["job"], "hive", "{labels}");
    assert!(labels.get("exported_instance").is_none() && labels.get("exported_job").is_none(), "{labels}");

    // Frozen at both ends, the counter stands still at cpu.stat's figure, whenever the
    // daemon sampled and Prometheus scraped.
    freeze(&dir);
    let (start, kernel_start) = plateau(&server, port, &dir);
    thaw(&dir);
    std::thread::sleep(Duration::from_secs(5));
    freeze(&dir);
    let (end, kernel_end) = plateau(&server, port, &dir);
    thaw(&dir);

    // The scraped samples: the last at the first plateau and the first at the second bound
    // the window the CPU time was used in; rate() over exactly that window, at its end.
    let raw = server.query(&format!("{CPU}[2m]"), None);
    let samples: Vec<(f64, f64)> =
        raw[0]["values"].as_array().unwrap().iter().map(|v| (v[0].as_f64().unwrap(), value(v))).collect();
    let near = |v: f64, x: f64| (v - x).abs() < 1e-9;
    let from = samples.iter().rev().find(|s| near(s.1, start)).expect("a sample at the first plateau");
    let to = samples.iter().find(|s| near(s.1, end)).expect("a sample at the second plateau");
    let window_ms = ((to.0 - from.0) * 1000.0).round() as u64;
    let rate = server.query(&format!("rate({CPU}[{window_ms}ms])"), Some(to.0));
    let promql = value(&rate[0]["value"]) * 100.0;
    let kernel = (kernel_end - kernel_start) * 100.0 / (to.0 - from.0);
    eprintln!(
        "rate({CPU}[{window_ms}ms]) at {:.3} = {promql:.3} %   cpu.stat usage_usec {:.0} -> {:.0} over the same \
         {window_ms} ms = {kernel:.3} %",
        to.0,
        kernel_start * 1e6,
        kernel_end * 1e6,
    );
    assert!((promql - kernel).abs() <= 1.0, "PromQL rate {promql} % vs cpu.stat {kernel} %");
    assert!(kernel > 5.0, "the load used {kernel} % of a core: not the case needed");

    // A worker removed goes stale: its series has no current value, the other's stays.
    drop(load);
    wait_for(
        || {
            std::fs::read_to_string(dir.join("cgroup.procs")).is_ok_and(|p| p.trim().is_empty())
                && std::fs::remove_dir(&dir).is_ok()
        },
        Duration::from_secs(10),
        "the worker's cgroup to be removed",
    );
    wait_for(
        || server.query(CPU, None).is_empty(),
        Duration::from_secs(30),
        "the removed worker's series to go stale",
    );
    let kept = server.query("hive_worker_cpu_seconds_total{worker=\"9090\"}", None);
    assert_eq!(kept.len(), 1, "the remaining worker keeps its series: {kept:?}");
}
