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
/// Reference fields with no source on this host (no NVML): they must be null, never 0.
const NOT_COLLECTED: [&str; 2] = ["gpu_util_pct", "vram_mb"];

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
        let programs = hb["collector"]["programs"].as_object().expect("collector.programs");
        assert_eq!(programs.len(), 6, "{programs:?}");
        assert!(programs.values().all(|s| s == "attached"), "every program attached: {programs:?}");
        assert_eq!(hb["collector"]["missing"], serde_json::json!({}), "no figure left out");
        let own = &hb["collector"]["self"];
        assert!(
            own["rss_bytes"].as_u64().unwrap() > 1 << 20 && own["cpu_s"].as_f64().unwrap() >= 0.0,
            "{own}"
        );
        assert!(own["kernel_s"].as_f64().unwrap() > 0.0, "the iterator's cost is measured: {own}");
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
    // A thread that never sleeps is, all the time, running or waiting to run: how much of
    // each depends on what else the machine runs, their sum does not (a hypervisor's steal
    // aside).
    let (cpu, runq) = (b["cpu_pct"].as_f64().unwrap(), b["runq_wait_pct"].as_f64().unwrap());
    assert!(cpu > 5.0 && cpu + runq > 70.0, "busy worker: {b}");
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
    assert!(
        b["io_syscall_read_bytes_total"].as_u64().is_some() && b["io_syscall_r_mb_s"].as_f64().is_some(),
        "{b}"
    );
    assert_eq!(beats[2]["collector"]["io_syscall"], "ebpf");
    assert!(b["io_r_mb_s"].as_f64().is_some() && beats[2]["collector"]["io_read"] == "ebpf", "{b}");
}

/// docs/design.md, Timeliness: a new worker is in the next heartbeat, an exited one gone from
/// the next.
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
    assert!(sample.workers[0].cpu_pct().unwrap() > 20.0, "{:?}", sample.workers[0]);

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

/// Without CAP_BPF/CAP_PERFMON the daemon says which it lacks, then keeps working from the
/// cgroup files (docs/design.md, Degradation) and labels its figures so. As root, the
/// capabilities are dropped for the child with setpriv.
#[test]
fn unprivileged_run_names_the_missing_capabilities_and_falls_back() {
    let args = ["run", "--count", "1", "--listen", "127.0.0.1:0"];
    // SAFETY: geteuid has no preconditions and cannot fail.
    let out = if unsafe { libc::geteuid() } == 0 {
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
                DAEMON,
            ])
            .args(args)
            .output()
            .expect("setpriv (util-linux)")
    } else {
        daemon(&args)
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("needs CAP_BPF and CAP_PERFMON (or root)") && stderr.contains("falling back"),
        "{stderr}"
    );
    let hb: Value = serde_json::from_slice(&out.stdout).expect("one heartbeat");
    assert_eq!(
        (hb["collector"]["cpu"].as_str(), hb["collector"]["runq"].as_str()),
        (Some("cgroup"), Some("unavailable"))
    );
}

#[test]
fn no_bpf_takes_cpu_from_cpu_stat_and_says_so() {
    if !bpf_available("no_bpf") {
        return;
    }
    let cg = TestCgroup::new("nobpf");
    let (busy, idle) = (cg.mkdir("rbee.slice/llm/busy"), cg.mkdir("rbee.slice/llm/idle"));
    let _loads = [
        Workload::start(HM_LOAD, &busy, &["busy", "1", "60"]),
        Workload::start(HM_LOAD, &idle, &["sleep", "60"]),
    ];
    let root = cg.root.to_string_lossy().into_owned();
    let out = daemon(&[
        "run",
        "--no-bpf",
        "--cgroup-root",
        &root,
        "--slice",
        &cg.rel("rbee.slice"),
        "--interval",
        "500ms",
        "--count",
        "4",
        "--listen",
        "127.0.0.1:0",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let beats: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut last_total = 0;
    for hb in &beats {
        assert_eq!(hb["collector"]["cpu"], "cgroup");
        assert_eq!(
            (hb["collector"]["runq"].as_str(), hb["collector"]["ctx_switches"].as_str()),
            (Some("unavailable"), Some("unavailable"))
        );
        let w =
            |i: &str| hb["workers"].as_array().unwrap().iter().find(|w| w["instance"] == i).unwrap().clone();
        let (b, i) = (w("busy"), w("idle"));
        assert!(
            b["runq_wait_pct"].is_null() && b["ctx_switches_voluntary_total"].is_null(),
            "not made up: {b}"
        );
        // Accuracy against cpu.stat is checked in cpu_accuracy.rs; here, that figures are present.
        assert!(b["cpu_pct"].as_f64().unwrap() > 5.0, "the busy worker shows CPU: {b}");
        assert!(i["cpu_pct"].as_f64().unwrap() < 1.0, "{i}");
        let total = b["cpu_ns_total"].as_u64().unwrap();
        assert!(total >= last_total, "cumulative CPU went backwards");
        last_total = total;
    }
}

#[test]
fn no_bpf_takes_io_from_proc_pid_io() {
    use std::io::BufRead;
    if !bpf_available("no_bpf_io") {
        return;
    }
    let cg = TestCgroup::new("nobpf_io");
    let dir = cg.mkdir("rbee.slice/llm/rw");
    let root = cg.root.to_string_lossy().into_owned();
    let mut daemon = Command::new(DAEMON)
        .args(["run", "--no-bpf", "--cgroup-root", &root, "--slice", &cg.rel("rbee.slice")])
        .args(["--interval", "300ms", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(daemon.stdout.take().unwrap()).lines();
    let mut next = || -> Value { serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap() };
    next();
    // Started after the daemon's first sample: all of its I/O falls inside watched intervals.
    let file =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("hm-nobpf-{}", std::process::id()));
    let load = Workload::start(HM_LOAD, &dir, &["rw", file.to_str().unwrap(), "32", "60"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while proc_field(load.pid(), "io", "rchar:") < 32 << 20 {
        assert!(std::time::Instant::now() < deadline, "the load did not finish");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (mut hb, mut last_total) = (next(), 0);
    for _ in 0..3 {
        hb = next();
        let total = hb["workers"][0]["io_syscall_write_bytes_total"].as_u64().expect("present");
        assert!(total >= last_total, "cumulative I/O went backwards");
        last_total = total;
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
    let _ = std::fs::remove_file(&file);
    for what in ["io_read", "io_write", "io_syscall"] {
        assert_eq!(hb["collector"][what], "procfs", "{what}");
    }
    let w = &hb["workers"][0];
    for (figure, key) in [
        ("io_syscall_read_bytes_total", "rchar:"),
        ("io_syscall_write_bytes_total", "wchar:"),
        ("io_write_bytes_total", "write_bytes:"),
    ] {
        let (ours, kernel) = (w[figure].as_u64().unwrap(), proc_field(load.pid(), "io", key));
        eprintln!("no-bpf {figure}: {ours} vs /proc io {key} {kernel}");
        assert!(ours.abs_diff(kernel) as f64 <= kernel as f64 * 0.01, "{figure} {ours} vs {kernel}: {w}");
    }
    assert!(w["io_w_mb_s"].as_f64().is_some() && w["runq_wait_pct"].is_null(), "{w}");
}

#[test]
fn pull_api_serves_the_latest_heartbeat_and_prometheus_metrics() {
    if !bpf_available("pull_api") {
        return;
    }
    let cg = TestCgroup::new("pull");
    let dir = cg.mkdir("rbee.slice/llm/8080");
    let _load = Workload::start(HM_LOAD, &dir, &["busy", "1", "60", "--model", "llama-3.2-1b"]);
    let token = std::env::temp_dir().join(format!("hm-api-token-{}", std::process::id()));
    std::fs::write(&token, "pull-s3cret\n").unwrap();
    let port = free_port();
    let root = cg.root.to_string_lossy().into_owned();
    let mut child = Command::new(DAEMON)
        .args(["run", "--cgroup-root", &root, "--slice", &cg.rel("rbee.slice"), "--interval", "200ms"])
        .args(["--count", "25", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--api-token-file", token.to_str().unwrap()])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let authed = |path: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let r = client.get(format!("{base}{path}")).bearer_auth("pull-s3cret").send();
            if let Ok(r) = r.and_then(|r| r.error_for_status()) {
                return r.text().unwrap();
            }
            assert!(std::time::Instant::now() < deadline, "{path} never answered");
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    let hb: Value = serde_json::from_str(&authed("/v1/heartbeat")).unwrap();
    assert!(hb["seq"].as_u64().unwrap() >= 1 && hb["workers"][0]["instance"] == "8080", "{hb}");
    let caps: Value = serde_json::from_str(&authed("/v1/capabilities")).unwrap();
    assert!(
        caps["cpu_cores"].as_u64().unwrap() >= 1 && caps["ram_total_gb"].as_f64().unwrap() > 0.0,
        "{caps}"
    );
    assert!(caps["gpus"].is_null(), "no NVML here: GPUs unknown, not an empty list: {caps}");
    assert_eq!(authed("/healthz"), "ok\n");

    std::thread::sleep(Duration::from_millis(600)); // the model name is read off-thread
    let text = authed("/metrics");
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("Prometheus text format");
    let cpu = scrape.samples.iter().find(|s| s.metric == "hive_worker_cpu_seconds_total").expect(&text);
    assert_eq!((cpu.labels.get("group"), cpu.labels.get("worker")), (Some("llm"), Some("8080")));
    assert!(matches!(cpu.value, prometheus_parse::Value::Counter(v) if v > 0.1), "{:?}", cpu.value);
    let info = scrape.samples.iter().find(|s| s.metric == "hive_worker_info").expect(&text);
    assert_eq!(info.labels.get("model"), Some("llama-3.2-1b"), "{text}");
    // A plain client gets the classic text format; Prometheus, asking for it, OpenMetrics.
    assert!(
        text.contains("# TYPE hive_worker_cpu_seconds_total counter") && !text.contains("# EOF"),
        "{text}"
    );
    let open = client
        .get(format!("{base}/metrics"))
        .bearer_auth("pull-s3cret")
        .header("Accept", "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5")
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(open.contains("# TYPE hive_worker_cpu_seconds counter") && open.ends_with("# EOF\n"), "{open}");
    assert!(!text.contains("hive_worker_gpu_memory_bytes{"), "no VRAM figure, so no series: {text}");
    let io: Vec<_> = scrape.samples.iter().filter(|s| s.metric == "hive_worker_io_bytes_total").collect();
    let levels: std::collections::BTreeSet<_> =
        io.iter().map(|s| (s.labels.get("level").unwrap(), s.labels.get("direction").unwrap())).collect();
    assert_eq!(levels.len(), 4, "storage and syscall, read and write: {text}");

    // Without the token: refused.
    let r = client.get(format!("{base}/v1/heartbeat")).send().unwrap();
    assert_eq!(r.status(), 401);
    let r = client.get(format!("{base}/v1/heartbeat")).bearer_auth("wrong").send().unwrap();
    assert_eq!(r.status(), 401);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&token);

    // Off loopback without a token: refused at start.
    let out = daemon(&[
        "run",
        "--cgroup-root",
        &root,
        "--slice",
        &cg.rel("rbee.slice"),
        "--listen",
        "0.0.0.0:0",
        "--count",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs a token"), "{out:?}");
}

#[test]
fn the_config_file_applies_and_flags_override_it() {
    let config = std::env::temp_dir().join(format!("hm-config-{}.toml", std::process::id()));
    std::fs::write(&config, "interval = \"1s\"\nintervall = \"2s\"\n").unwrap();
    let out = daemon(&["run", "--config", config.to_str().unwrap(), "--count", "1"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("config ") && stderr.contains("unknown field `intervall`"), "{stderr}");

    if !bpf_available("config_file") {
        let _ = std::fs::remove_file(&config);
        return;
    }
    let cg = TestCgroup::new("config");
    cg.mkdir("rbee.slice/llm/8080");
    let settings = format!(
        "slice = \"{}\"\ncgroup_root = \"{}\"\ninterval = \"5s\"\nlisten = \"127.0.0.1:0\"\nhive_id = \"from-config\"\n",
        cg.rel("rbee.slice"),
        cg.root.display()
    );
    std::fs::write(&config, settings).unwrap();
    let out = daemon(&["run", "--config", config.to_str().unwrap(), "--interval", "200ms", "--count", "2"]);
    let _ = std::fs::remove_file(&config);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let last: Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(last["hive"]["id"], "from-config");
    assert_eq!(last["workers"][0]["instance"], "8080", "the slice comes from the config file");
    assert!(last["interval_ms"].as_f64().unwrap() < 1000.0, "the --interval flag wins over the file: {last}");
}

#[test]
fn sigterm_sends_a_last_heartbeat_saying_stopping_and_exits_0() {
    if !bpf_available("sigterm") {
        return;
    }
    use std::io::BufRead;
    let cg = TestCgroup::new("sigterm");
    cg.mkdir("rbee.slice/llm/8080");
    let root = cg.root.to_string_lossy().into_owned();
    let mut child = Command::new(DAEMON)
        .args(["run", "--cgroup-root", &root, "--slice", &cg.rel("rbee.slice"), "--interval", "10s"])
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The first heartbeat comes after one interval: signal well before it.
    std::thread::sleep(Duration::from_millis(1500));
    let signalled = std::time::Instant::now();
    // SAFETY: plain kill(2) on the pid of a child this test spawned and has not yet waited for.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0));
    assert!(took < Duration::from_secs(2), "exit took {took:?} after SIGTERM");
    let lines: Vec<String> =
        std::io::BufReader::new(child.stdout.take().unwrap()).lines().map(Result::unwrap).collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let last: Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(last["hive"]["operational_status"], "stopping");
    assert_eq!(last["workers"][0]["instance"], "8080");
}

#[test]
fn sighup_reloads_the_config_file_and_keeps_it_when_malformed() {
    use std::io::BufRead;
    if !bpf_available("sighup") {
        return;
    }
    let cg = TestCgroup::new("sighup");
    cg.mkdir("rbee.slice/llm/8080");
    let config = std::env::temp_dir().join(format!("hm-sighup-{}.toml", std::process::id()));
    let write = |hive_id: &str, interval: &str| {
        let text = format!(
            "slice = \"{}\"\ncgroup_root = \"{}\"\ninterval = \"{interval}\"\nlisten = \"127.0.0.1:0\"\nhive_id = \"{hive_id}\"\n",
            cg.rel("rbee.slice"),
            cg.root.display()
        );
        std::fs::write(&config, text).unwrap();
    };
    write("before", "300ms");
    let mut child = Command::new(DAEMON)
        .args(["run", "--config", config.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    // SAFETY: signalling our own child.
    let hup = || unsafe { libc::kill(pid, libc::SIGHUP) };
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = || -> Value { serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap() };
    assert_eq!(next()["hive"]["id"], "before");
    write("after", "100ms");
    assert_eq!(hup(), 0);
    let mut seen = Vec::new();
    for _ in 0..6 {
        let hb = next();
        seen.push((hb["hive"]["id"].as_str().unwrap().to_string(), hb["interval_ms"].as_f64().unwrap()));
    }
    let (id, interval) = seen.last().unwrap().clone();
    assert_eq!(id, "after", "{seen:?}");
    assert!((90.0..150.0).contains(&interval), "the new interval applies: {seen:?}");

    std::fs::write(&config, "interval = \"soon\"\n").unwrap();
    assert_eq!(hup(), 0);
    let (mut seqs, mut ids) = (Vec::new(), Vec::new());
    for _ in 0..4 {
        let hb = next();
        seqs.push(hb["seq"].as_u64().unwrap());
        ids.push(hb["hive"]["id"].as_str().unwrap().to_string());
    }
    // SAFETY: plain kill(2) on the pid of a child this test spawned and has not yet waited for.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    let _ = std::fs::remove_file(&config);
    assert!(status.success(), "{status}: {stderr}");
    assert!(ids.iter().all(|i| i == "after"), "a malformed file changes nothing: {ids:?}");
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "no heartbeat missed: {seqs:?}");
    assert!(stderr.contains("SIGHUP") && stderr.contains("keeping the running settings"), "{stderr}");
}

#[test]
fn a_second_daemon_on_the_same_slice_refuses_to_start() {
    use std::io::BufRead;
    if !bpf_available("second_daemon") {
        return;
    }
    let cg = TestCgroup::new("second");
    cg.mkdir("rbee.slice/llm/8080");
    let root = cg.root.to_string_lossy().into_owned();
    let args = ["run", "--cgroup-root", &root, "--slice", &cg.rel("rbee.slice"), "--listen", "127.0.0.1:0"];
    let mut first = Command::new(DAEMON)
        .args(args)
        .args(["--interval", "200ms"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(first.stdout.take().unwrap()).lines();
    lines.next().unwrap().unwrap(); // running

    let second = Command::new(DAEMON).args(args).args(["--count", "1"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{stderr}");
    assert!(second.stdout.is_empty(), "no heartbeat from the second");
    assert!(
        stderr.contains("already watches") && stderr.contains(&format!("pid {}", first.id())),
        "says who holds the slice: {stderr}"
    );
    lines.next().unwrap().unwrap(); // the first goes on

    let _ = first.kill();
    let _ = first.wait();
    let third = Command::new(DAEMON).args(args).args(["--count", "1"]).output().unwrap();
    assert!(
        third.status.success(),
        "free again once the first is gone: {}",
        String::from_utf8_lossy(&third.stderr)
    );
}

#[test]
fn after_loading_the_probes_only_two_capabilities_are_left() {
    use std::io::BufRead;
    if !bpf_available("capabilities") {
        return;
    }
    let cg = TestCgroup::new("caps");
    let dir = cg.mkdir("rbee.slice/llm/8080");
    let _load = Workload::start(HM_LOAD, &dir, &["busy", "1", "60"]);
    let root = cg.root.to_string_lossy().into_owned();
    // Every helper thread running: the pull API, a stream announcer, the record, OTLP.
    let record =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("hm-caps-{}", std::process::id()));
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let mut child = Command::new(DAEMON)
        .args(["run", "--cgroup-root", &root, "--slice", &cg.rel("rbee.slice"), "--interval", "200ms"])
        .args(["--listen", "127.0.0.1:0", "--record", record.to_str().unwrap(), "--otlp-endpoint", &nowhere])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = || -> Value { serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap() };
    let first = next();
    let hex = |name: &str| {
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
        let v = status.lines().find_map(|l| l.strip_prefix(name)).unwrap().trim().to_string();
        u64::from_str_radix(&v, 16).unwrap_or_else(|_| v.parse().unwrap())
    };
    // CAP_DAC_READ_SEARCH (2) and CAP_SYS_PTRACE (19).
    let kept = 1 << 2 | 1 << 19;
    let sets =
        [hex("CapEff:"), hex("CapPrm:"), hex("CapBnd:"), hex("CapInh:"), hex("CapAmb:"), hex("NoNewPrivs:")];
    // Capabilities belong to each thread: every other thread of the daemon holds at most what
    // the main one kept, and its own helper threads none.
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{}/task", child.id())).unwrap().flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let field = |name: &str| {
            let v = status.lines().find_map(|l| l.strip_prefix(name)).unwrap_or("0").trim();
            u64::from_str_radix(v, 16).unwrap_or(u64::MAX)
        };
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default().trim().to_string();
        threads.push((name, field("CapEff:"), field("CapPrm:")));
    }
    assert!(threads.len() > 3, "{threads:?}");
    eprintln!("capabilities per thread: {threads:?}");
    for (name, eff, prm) in &threads {
        assert!(eff & !kept == 0 && prm & !kept == 0, "thread {name} holds more than was kept: {threads:?}");
        if ["pull-api", "signals", "record", "otlp", "model-names"].contains(&name.as_str()) {
            assert_eq!((*eff, *prm), (0, 0), "helper thread {name} holds capabilities: {threads:?}");
        }
    }
    // The maps are still read through the descriptors held: CPU keeps coming from the probes.
    let later = next();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&record);
    assert_eq!(
        sets,
        [kept, kept, kept, 0, 0, 1],
        "effective, permitted, bounding, inheritable, ambient, no_new_privs"
    );
    assert_eq!(later["collector"]["cpu"], "ebpf");
    let cpu = |hb: &Value| hb["workers"][0]["cpu_ns_total"].as_u64().unwrap();
    assert!(cpu(&later) > cpu(&first), "counters still read after the drop");
}

/// Workers' files are kept open between samples; with too few descriptors for all of them
/// (300: room for 44 of the 120 wanted beside the 256 reserved), the rest are read the
/// plain way, nothing else runs out, and every figure is still there.
#[test]
fn few_file_descriptors_lose_no_figure() {
    if !bpf_available("few_fds") {
        return;
    }
    let cg = TestCgroup::new("few_fds");
    let _loads: Vec<_> = (0..60)
        .map(|i| Workload::start(HM_LOAD, &cg.mkdir(&format!("rbee.slice/g/w{i}")), &["sleep", "60"]))
        .collect();
    let root = cg.root.to_string_lossy().into_owned();
    let out = Command::new("prlimit")
        .args(["--nofile=300:300", DAEMON, "run", "--cgroup-root", &root, "--slice", &cg.rel("rbee.slice")])
        .args(["--interval", "200ms", "--count", "3", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let last: Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    let workers = last["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 60);
    for w in workers {
        assert!(w["rss_mb"].is_u64() && w["cpu_pct"].is_f64() && w["pid"].is_u64(), "{w}");
    }
}
