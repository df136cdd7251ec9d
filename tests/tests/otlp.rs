//! `run --otlp-endpoint`: a loopback collector decodes every OTLP/HTTP protobuf export and
//! each data point is compared with the heartbeat of the same interval (the daemon's standard
//! output); and a collector that never answers does not hold up heartbeats.
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use hive_monitor_tests::*;
use opentelemetry_proto::tonic::{
    collector::metrics::v1::ExportMetricsServiceRequest,
    common::v1::{any_value::Value as AnyValue, KeyValue},
    metrics::v1::{metric::Data, number_data_point::Value as Number, NumberDataPoint},
};
use prost::Message;
use serde_json::Value;

const DAEMON: &str = env!("CARGO_BIN_EXE_hm-daemon");
const HM_LOAD: &str = env!("CARGO_BIN_EXE_hm-load");

/// One POST: its request line and decoded body.
type Received = Arc<Mutex<Vec<(String, ExportMetricsServiceRequest)>>>;

/// Serves OTLP/HTTP on `listener` until the test ends: decodes each request and answers 200,
/// or, with `hang`, never answers.
fn collector(listener: TcpListener, hang: bool) -> Received {
    let received = Received::default();
    let log = Arc::clone(&received);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                while let Some((line, body)) = read_request(&conn) {
                    let request = ExportMetricsServiceRequest::decode(body.as_slice())
                        .unwrap_or_else(|e| panic!("{line}: not an OTLP metrics request: {e}"));
                    log.lock().unwrap().push((line, request));
                    if hang {
                        std::thread::sleep(Duration::from_secs(3600));
                    }
                    let reply = "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                    if conn.write_all(reply.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    received
}

fn read_request(conn: &TcpStream) -> Option<(String, Vec<u8>)> {
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut length = 0;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).ok()?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':')?;
        if name.eq_ignore_ascii_case("content-length") {
            length = value.trim().parse().ok()?;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some((line.trim_end().to_string(), body))
}

fn text(kv: &KeyValue) -> String {
    match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        other => panic!("attribute {}: unexpected value {other:?}", kv.key),
    }
}

/// (metric, sorted attributes) → value.
type Points = BTreeMap<(String, Vec<(String, String)>), f64>;

fn point_value(p: &NumberDataPoint) -> f64 {
    match p.value {
        Some(Number::AsDouble(v)) => v,
        Some(Number::AsInt(v)) => v as f64,
        None => panic!("data point without a value"),
    }
}

/// The data points of one export.
fn points(request: &ExportMetricsServiceRequest) -> Points {
    let mut out = Points::new();
    for rm in &request.resource_metrics {
        for sm in &rm.scope_metrics {
            for m in &sm.metrics {
                let data_points = match &m.data {
                    Some(Data::Gauge(g)) => &g.data_points,
                    Some(Data::Sum(s)) => {
                        assert!(s.is_monotonic, "{}: a counter", m.name);
                        &s.data_points
                    }
                    other => panic!("{}: unexpected data {other:?}", m.name),
                };
                for p in data_points {
                    let mut attrs: Vec<_> =
                        p.attributes.iter().map(|kv| (kv.key.clone(), text(kv))).collect();
                    attrs.sort();
                    let old = out.insert((m.name.clone(), attrs), point_value(p));
                    assert!(old.is_none(), "{}: one data point per series", m.name);
                }
            }
        }
    }
    out
}

/// What the README's mapping says a heartbeat exports: null figures have no entry.
fn expected(hb: &Value) -> Points {
    let mut out = Points::new();
    let mut put = |name: &str, attrs: &[(&str, String)], v: Option<f64>| {
        if let Some(v) = v {
            let mut attrs: Vec<_> = attrs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
            attrs.sort();
            out.insert((name.to_string(), attrs), v);
        }
    };
    put("rbee.hive.heartbeat.seq", &[], hb["seq"].as_f64());
    put("system.cpu.utilization", &[], hb["hive"]["cpu_usage_percent"].as_f64().map(|p| p / 100.0));
    let own = &hb["collector"]["self"];
    let interval_ms = hb["interval_ms"].as_f64().unwrap();
    put("rbee.monitor.cpu.usage", &[], own["cpu_s"].as_f64().map(|s| s * 1000.0 / interval_ms));
    put("rbee.monitor.memory.usage", &[], own["rss_bytes"].as_f64());
    for (reason, n) in hb["collector"]["probes"].as_object().unwrap() {
        put("rbee.monitor.probe.losses", &[("rbee.loss.reason", reason.clone())], n.as_f64());
    }
    for w in hb["workers"].as_array().unwrap() {
        let worker = [
            ("rbee.worker.group", w["group"].as_str().unwrap().to_string()),
            ("rbee.worker.instance", w["instance"].as_str().unwrap().to_string()),
        ];
        let secs = |v: &Value| v.as_u64().map(|ns| ns as f64 / 1e9);
        let share = |v: &Value| v.as_f64().map(|p| p / 100.0);
        let count = |v: &Value| v.as_u64().map(|n| n as f64);
        let with = |key: &'static str, value: &str| {
            let mut attrs = worker.to_vec();
            attrs.push((key, value.to_string()));
            attrs
        };
        put("container.cpu.time", &worker, secs(&w["cpu_ns_total"]));
        put("container.cpu.usage", &worker, share(&w["cpu_pct"]));
        put("rbee.worker.cpu.runq_wait.time", &worker, secs(&w["runq_wait_ns_total"]));
        put("rbee.worker.cpu.runq_wait.usage", &worker, share(&w["runq_wait_pct"]));
        put("rbee.worker.cpu.runq_waits", &worker, count(&w["runq_waits_total"]));
        for kind in ["voluntary", "involuntary"] {
            let attrs = with("process.context_switch.type", kind);
            put("rbee.worker.context_switches", &attrs, count(&w[format!("ctx_switches_{kind}_total")]));
        }
        put("rbee.worker.processes", &worker, count(&w["processes"]));
        for (event, field) in
            [("fork", "processes_forked_total"), ("exec", "execs_total"), ("exit", "processes_exited_total")]
        {
            put("rbee.worker.process.events", &with("rbee.process.event", event), count(&w[field]));
        }
        for direction in ["read", "write"] {
            let storage = &w[format!("io_{direction}_bytes_total")];
            put("container.disk.io", &with("disk.io.direction", direction), count(storage));
            let syscall = &w[format!("io_syscall_{direction}_bytes_total")];
            put("rbee.worker.io.syscall", &with("rbee.io.direction", direction), count(syscall));
        }
        let memory = &w["memory"];
        put("container.memory.usage", &worker, count(&memory["current_bytes"]));
        for kind in ["anon", "file"] {
            put(
                "rbee.worker.memory.usage",
                &with("rbee.memory.type", kind),
                count(&memory[format!("{kind}_bytes")]),
            );
        }
        put("rbee.worker.memory.peak", &worker, count(&memory["peak_bytes"]));
        put("rbee.worker.memory.limit", &worker, count(&memory["limit_bytes"]));
        put("rbee.worker.memory.oom_kills", &worker, count(&memory["oom_kills"]));
        for resource in ["cpu", "memory", "io"] {
            for scope in ["some", "full"] {
                let stall = &w["pressure"][resource];
                let mut attrs = with("rbee.pressure.resource", resource);
                attrs.push(("rbee.pressure.scope", scope.to_string()));
                put("rbee.worker.pressure.stall.time", &attrs, secs(&stall[format!("{scope}_ns_total")]));
                put("rbee.worker.pressure.stall.utilization", &attrs, share(&stall[format!("{scope}_pct")]));
            }
        }
        for d in w["gpus"].as_array().into_iter().flatten() {
            let attrs = with("rbee.gpu.index", &d["device_index"].to_string());
            put("rbee.worker.gpu.utilization", &attrs, share(&d["sm_util_pct"]));
            put("rbee.worker.gpu.memory.usage", &attrs, count(&d["vram_bytes"]));
        }
    }
    for d in hb["hive"]["vram_per_device"].as_array().into_iter().flatten() {
        let index = d["device_index"].as_u64().unwrap();
        let id = d["uuid"].as_str().map_or_else(|| index.to_string(), str::to_string);
        let attrs = [("hw.id", id), ("rbee.gpu.index", index.to_string())];
        put("hw.gpu.utilization", &attrs, d["gpu_utilization_percent"].as_f64().map(|p| p / 100.0));
        put("hw.gpu.memory.usage", &attrs, d["vram_used_bytes"].as_u64().map(|b| b as f64));
        put("hw.gpu.memory.limit", &attrs, d["vram_total_bytes"].as_u64().map(|b| b as f64));
    }
    out
}

fn daemon(cg: &TestCgroup, url: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new(DAEMON);
    cmd.args(["run", "--cgroup-root", &cg.root.to_string_lossy(), "--slice", &cg.rel("rbee.slice")])
        .args(["--listen", "127.0.0.1:0", "--otlp-endpoint", url])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn heartbeats(stdout: &[u8]) -> BTreeMap<u64, Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .map(|hb| (hb["seq"].as_u64().unwrap(), hb))
        .collect()
}

#[test]
fn every_export_equals_its_heartbeat() {
    if !bpf_available("otlp_equals") {
        return;
    }
    let cg = TestCgroup::new("otlp_equal");
    let busy = cg.mkdir("rbee.slice/llm/8080");
    let _busy = Workload::start(HM_LOAD, &busy, &["busy", "1", "60"]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let received = collector(listener, false);

    let out = daemon(&cg, &url, &["--interval", "300ms", "--count", "10"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let beats = heartbeats(&out.stdout);
    assert_eq!(beats.len(), 10);
    let got = received.lock().unwrap().clone();
    assert!(!got.is_empty(), "nothing exported");
    let mut compared = Vec::new();
    for (line, request) in &got {
        assert_eq!(line, "POST /v1/metrics HTTP/1.1");
        let resource: BTreeMap<_, _> = request.resource_metrics[0]
            .resource
            .as_ref()
            .unwrap()
            .attributes
            .iter()
            .map(|kv| (kv.key.clone(), text(kv)))
            .collect();
        let points = points(request);
        // The SDK's final export at shutdown observes no heartbeat; an empty one is harmless.
        if points.is_empty() {
            continue;
        }
        let seq = points[&("rbee.hive.heartbeat.seq".to_string(), vec![])] as u64;
        let hb = &beats[&seq];
        assert_eq!(resource["service.name"], "hive-monitor");
        assert_eq!(resource["host.name"], hb["hive"]["hostname"].as_str().unwrap());
        let want = expected(hb);
        // The figures this worker must have: a test that cannot see them proves nothing.
        for name in [
            "container.cpu.time",
            "rbee.worker.cpu.runq_wait.time",
            "rbee.worker.context_switches",
            "rbee.worker.process.events",
            "rbee.worker.io.syscall",
            "rbee.worker.pressure.stall.time",
        ] {
            assert!(want.keys().any(|(n, _)| n == name), "no {name} in heartbeat {seq}: {hb}");
        }
        assert_eq!(points, want, "heartbeat {seq}");
        compared.push(seq);
    }
    assert!(compared.windows(2).all(|w| w[0] < w[1]), "exports in heartbeat order: {compared:?}");
    assert_eq!(compared.last(), Some(&10), "the last heartbeat is exported before exit");
    // The busy worker's CPU is really there, not a zero that happens to match.
    let last = &beats[&10]["workers"][0];
    assert!(last["cpu_ns_total"].as_u64().unwrap() > 0, "{last}");
}

#[test]
fn a_collector_that_never_answers_does_not_hold_up_heartbeats() {
    if !bpf_available("otlp_hangs") {
        return;
    }
    let cg = TestCgroup::new("otlp_hang");
    cg.mkdir("rbee.slice/llm/8080");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let received = collector(listener, true);

    // Each export hangs for the whole timeout, longer than several intervals.
    let out =
        daemon(&cg, &url, &["--interval", "200ms", "--count", "20", "--timeout", "2s"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let beats = heartbeats(&out.stdout);
    assert_eq!(beats.keys().copied().collect::<Vec<_>>(), (1..=20).collect::<Vec<_>>());
    // Every interval after the first kept its length: none waited for the collector. The
    // bound is generous (5 intervals) for a loaded machine; a wait on the hung collector would be
    // the 2 s timeout.
    for hb in beats.values().skip(1) {
        let ms = hb["interval_ms"].as_f64().unwrap();
        assert!(ms < 1000.0, "heartbeat {} covered {ms} ms: sampling was held up", hb["seq"]);
    }
    assert!(!received.lock().unwrap().is_empty(), "the collector was never contacted");
}
