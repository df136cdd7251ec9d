//! Heartbeats POSTed to a coordinator: path, token and body; the acknowledgement honoured;
//! and a coordinator that is down, failing, answering garbage or too slowly never holds up
//! sampling. The coordinator here is a scripted HTTP server on loopback.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hive_monitor_tests::*;
use serde_json::Value;

const DAEMON: &str = env!("CARGO_BIN_EXE_hm-daemon");

#[derive(Clone, Debug)]
struct Request {
    line: String,
    authorization: Option<String>,
    body: Value,
}

/// How the coordinator answers request number n (from 0): status, body, delay.
type Script = fn(usize) -> (u16, &'static str, Duration);

/// Serves `script` on `listener`, each connection on a thread of its own, until the test
/// ends; returns what it received, in arrival order.
fn coordinator(listener: TcpListener, script: Script) -> Arc<Mutex<Vec<Request>>> {
    let received = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&received);
    std::thread::spawn(move || {
        for (n, conn) in listener.incoming().enumerate() {
            let Ok(mut conn) = conn else { continue };
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                if let Some(req) = read_request(&conn) {
                    log.lock().unwrap().push(req);
                }
                let (status, body, delay) = script(n);
                std::thread::sleep(delay);
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    received
}

fn read_request(conn: &TcpStream) -> Option<Request> {
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let (mut length, mut authorization) = (0, None);
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).ok()?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':')?;
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = value.trim().parse().ok()?,
            "authorization" => authorization = Some(value.trim().to_string()),
            _ => {}
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some(Request {
        line: line.trim_end().to_string(),
        authorization,
        body: serde_json::from_slice(&body).ok()?,
    })
}

fn run_daemon(cg: &TestCgroup, url: &str, extra: &[&str]) -> (std::process::Output, Duration) {
    let root = cg.root.to_string_lossy().into_owned();
    let started = Instant::now();
    let out = Command::new(DAEMON)
        .args(["run", "--cgroup-root", &root, "--slice", &cg.rel("rbee.slice"), "--coordinator", url])
        .args(["--coordinator-protocol", "push", "--listen", "127.0.0.1:0"])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("run hive-monitor");
    (out, started.elapsed())
}

fn seqs(received: &Arc<Mutex<Vec<Request>>>) -> Vec<u64> {
    received.lock().unwrap().iter().filter_map(|r| r.body["seq"].as_u64()).collect()
}

#[test]
fn posts_heartbeats_and_honours_the_acknowledgement() {
    if !bpf_available("coordinator_posts") {
        return;
    }
    let cg = TestCgroup::new("coord_post");
    cg.mkdir("rbee.slice/llm/8080");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let received =
        coordinator(listener, |_| (200, r#"{"server_status":"ok","next_interval_ms":150}"#, Duration::ZERO));
    let token = std::env::temp_dir().join(format!("hm-token-{}", std::process::id()));
    std::fs::write(&token, "s3cret\n").unwrap();

    let (out, took) =
        run_daemon(&cg, &url, &["--interval", "1s", "--count", "8", "--token-file", token.to_str().unwrap()]);
    let _ = std::fs::remove_file(&token);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout.is_empty(), "with a coordinator nothing goes to stdout");
    let got = received.lock().unwrap().clone();
    assert!(!got.is_empty());
    for r in &got {
        assert_eq!(r.line, "POST /v1/hive-heartbeat HTTP/1.1");
        assert_eq!(r.authorization.as_deref(), Some("Bearer s3cret"));
        assert_eq!(r.body["workers"][0]["instance"], "8080");
    }
    assert_eq!(seqs(&received).last(), Some(&8), "the last heartbeat is delivered before exit");
    // After the first acknowledgement the daemon samples every 150 ms, not every second.
    assert!(took < Duration::from_secs(5), "8 heartbeats took {took:?}: next_interval_ms was not honoured");
    let last = &got.last().unwrap().body;
    assert!((100.0..300.0).contains(&last["interval_ms"].as_f64().unwrap()), "{last}");
}

static HUGE_REPLY: std::sync::OnceLock<String> = std::sync::OnceLock::new();

#[test]
fn a_misbehaving_coordinator_never_holds_up_sampling() {
    if !bpf_available("coordinator_misbehaves") {
        return;
    }
    let cg = TestCgroup::new("coord_bad");
    cg.mkdir("rbee.slice/llm/8080");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let received = coordinator(listener, |n| match n {
        0 => (500, "boom", Duration::ZERO),
        1 => (200, "<html>garbage</html>", Duration::ZERO),
        2 => (200, "{}", Duration::from_secs(3)), // beyond the 500 ms timeout
        3 => (503, "", Duration::ZERO),
        // Malformed acknowledgements: ignored, and an interval out of bounds not honoured.
        4 => (200, r#"{"next_interval_ms":1}"#, Duration::ZERO),
        5 => (200, r#"{"next_interval_ms":-5}"#, Duration::ZERO),
        6 => (200, r#"{"next_interval_ms":"soon"}"#, Duration::ZERO),
        7 => (200, r#"{"next_interval_ms":1e30,"server_status":7}"#, Duration::ZERO),
        8 => (
            200,
            r#"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["#,
            Duration::ZERO,
        ),
        9 => (200, HUGE_REPLY.get_or_init(|| "x".repeat(1 << 20)), Duration::ZERO),
        _ => (200, "", Duration::ZERO),
    });

    let (out, took) = run_daemon(&cg, &url, &["--interval", "200ms", "--count", "20", "--timeout", "500ms"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // 20 samples at 200 ms: about 4 s, whatever the coordinator did.
    assert!(took < Duration::from_millis(5500), "sampling was held up: 20 heartbeats took {took:?}");
    assert!(took > Duration::from_secs(3), "an out-of-bounds next_interval_ms was honoured: {took:?}");
    let seqs = seqs(&received);
    assert!(seqs.len() >= 5, "the daemon kept delivering after the failures: {seqs:?}");
    assert!(seqs.windows(2).all(|w| w[0] <= w[1]), "never an older heartbeat after a newer one: {seqs:?}");
    assert!(*seqs.last().unwrap() >= 15, "recent heartbeats reach it: {seqs:?}");
}

#[test]
fn a_coordinator_that_comes_up_late_gets_the_newest_heartbeats() {
    if !bpf_available("coordinator_late") {
        return;
    }
    let cg = TestCgroup::new("coord_late");
    cg.mkdir("rbee.slice/llm/8080");
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let api = free_port();
    let root = cg.root.to_string_lossy().into_owned();
    let mut child = Command::new(DAEMON)
        .args(["run", "--cgroup-root", &root, "--slice", &cg.rel("rbee.slice")])
        .args(["--coordinator", &format!("http://127.0.0.1:{port}"), "--coordinator-protocol", "push"])
        .args(["--interval", "200ms", "--count", "20", "--listen", &format!("127.0.0.1:{api}")])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Sampling goes on while the coordinator is down.
    let seq = || {
        reqwest::blocking::get(format!("http://127.0.0.1:{api}/v1/heartbeat"))
            .and_then(|r| r.json::<serde_json::Value>())
            .map_or(0, |hb| hb["seq"].as_u64().unwrap_or(0))
    };
    wait_for(|| seq() >= 5, Duration::from_secs(20), "five heartbeats with the coordinator down");
    let up_at = seq();
    let received =
        coordinator(TcpListener::bind(("127.0.0.1", port)).unwrap(), |_| (200, "", Duration::ZERO));
    assert!(child.wait().unwrap().success());
    let seqs = seqs(&received);
    assert!(!seqs.is_empty(), "nothing delivered once the coordinator came up");
    assert!(seqs[0] >= up_at, "heartbeats from while it was down were superseded, not queued: {seqs:?}");
    assert!(*seqs.last().unwrap() >= 15, "{seqs:?}");
}

/// Resident memory of a process, bytes.
fn rss(pid: u32) -> u64 {
    proc_field(pid, "status", "VmRSS:") * 1024
}

#[test]
fn a_coordinator_that_goes_away_costs_no_memory_and_no_samples() {
    if !bpf_available("coordinator_gone") {
        return;
    }
    let cg = TestCgroup::new("coord_gone");
    cg.mkdir("rbee.slice/llm/8080");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let api = free_port();
    let received = coordinator(listener, |n| match n {
        // It answers a few heartbeats, then hangs on every request: gone, as far as the
        // daemon can tell, with connections that never complete.
        0..=2 => (200, "{}", Duration::ZERO),
        _ => (200, "{}", Duration::from_secs(3600)),
    });
    let root = cg.root.to_string_lossy().into_owned();
    let mut child = Command::new(DAEMON)
        .args([
            "run",
            "--cgroup-root",
            &root,
            "--slice",
            &cg.rel("rbee.slice"),
            "--coordinator",
            &format!("http://{addr}"),
            "--coordinator-protocol",
            "push",
        ])
        .args([
            "--interval",
            "100ms",
            "--timeout",
            "200ms",
            "--listen",
            &format!("127.0.0.1:{api}"),
            "--count",
            "60",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Measured from once the daemon is up and the coordinator hangs, not during start-up.
    wait_for(
        || {
            reqwest::blocking::get(format!("http://127.0.0.1:{api}/v1/heartbeat"))
                .and_then(|r| r.json::<serde_json::Value>())
                .is_ok_and(|hb| hb["seq"].as_u64() >= Some(10))
        },
        Duration::from_secs(20),
        "ten heartbeats",
    );
    let early = rss(child.id());
    std::thread::sleep(Duration::from_millis(3000));
    let late = rss(child.id());
    let status = child.wait().unwrap();
    assert!(status.success());
    eprintln!("coordinator_gone: daemon RSS {early} -> {late} bytes while the coordinator hung");
    assert!(late <= early + (1 << 20), "memory grew from {early} to {late} bytes with the coordinator gone");
    assert_eq!(seqs(&received)[..3], [1, 2, 3], "{:?}", seqs(&received));
}
