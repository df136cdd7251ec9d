//! Daemon → reference coordinator over loopback: the coordinator's `/v1/workers` shows a
//! worker started during the test and stops showing it once it is gone, each within about
//! one interval; its filters answer a scheduler's questions; a silent hive turns stale.
use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use hive_monitor_tests::*;
use serde_json::Value;

const HM_LOAD: &str = env!("CARGO_BIN_EXE_hm-load");
const DAEMON: &str = env!("CARGO_BIN_EXE_hm-daemon");
const INTERVAL: Duration = Duration::from_millis(300);

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `url` until `pred` holds of its JSON; returns how long that took.
fn until(client: &reqwest::blocking::Client, url: &str, pred: impl Fn(&Value) -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if let Ok(v) = client.get(url).send().and_then(|r| r.json::<Value>()) {
            if pred(&v) {
                return start.elapsed();
            }
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{url} never satisfied the condition");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn coordinator_sees_workers_come_and_go() {
    if !bpf_available("end_to_end") {
        return;
    }
    let cg = TestCgroup::new("e2e");
    cg.mkdir("rbee.slice");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let _queen = Killed(
        Command::new(DAEMON).args(["coordinator", "--listen", &format!("127.0.0.1:{port}")]).spawn().unwrap(),
    );
    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
    until(&client, &format!("{base}/v1/hives"), |v| v.is_array());

    let root = cg.root.to_string_lossy().into_owned();
    let daemon = Killed(
        Command::new(DAEMON)
            .args(["run", "--cgroup-root", &root, "--slice", &cg.rel("rbee.slice"), "--coordinator", &base])
            .args(["--coordinator-protocol", "push"])
            .args(["--interval", "300ms", "--listen", "127.0.0.1:0", "--hive-id", "hive-e2e"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let workers = format!("{base}/v1/workers");
    until(&client, &format!("{base}/v1/hives"), |v| v[0]["id"] == "hive-e2e");

    let dir = cg.mkdir("rbee.slice/llm/8080");
    let load = Workload::start(HM_LOAD, &dir, &["sleep", "60", "--model", "tiny-llama"]);
    let appeared =
        until(&client, &workers, |v| v.as_array().is_some_and(|a| a.iter().any(|w| w["instance"] == "8080")));
    eprintln!("end_to_end: worker visible at the coordinator after {appeared:?}");
    // One interval until the next sample, plus delivery.
    assert!(appeared < INTERVAL + Duration::from_millis(400), "took {appeared:?}");

    until(&client, &format!("{workers}?model=tiny-llama"), |v| v.as_array().is_some_and(|a| a.len() == 1));
    let other: Value = client.get(format!("{workers}?model=other")).send().unwrap().json().unwrap();
    assert_eq!(other, Value::Array(vec![]));
    let idle: Value = client.get(format!("{workers}?idle=true")).send().unwrap().json().unwrap();
    assert_eq!(idle[0]["hive_id"], "hive-e2e", "a sleeping worker with no GPU figures is idle: {idle}");
    let vram: Value = client.get(format!("{workers}?min_free_vram_mb=1")).send().unwrap().json().unwrap();
    assert_eq!(vram, Value::Array(vec![]), "no GPU here, so no free VRAM to offer");
    let bad = client.get(format!("{workers}?idel=true")).send().unwrap();
    assert_eq!(bad.status(), 400, "an unknown filter is refused, not ignored");

    drop(load);
    std::fs::remove_dir(&dir).unwrap();
    let gone = until(&client, &workers, |v| v.as_array().is_some_and(|a| a.is_empty()));
    eprintln!("end_to_end: worker gone at the coordinator after {gone:?}");
    assert!(gone < INTERVAL + Duration::from_millis(400), "took {gone:?}");

    // Silence: stale after two intervals.
    drop(daemon);
    let stale = until(&client, &format!("{base}/v1/hives"), |v| v[0]["stale"] == true);
    assert!(stale >= INTERVAL, "marked stale after {stale:?}, before two intervals had passed");

    // Garbage and unknown schema versions are refused with a reason.
    let r = client.post(format!("{base}/v1/hive-heartbeat")).body("{\"not\":1}").send().unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().unwrap().starts_with("not a heartbeat"));
}
