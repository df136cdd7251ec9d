//! Hostile input from the file system and the network: cgroup names no worker may have,
//! and requests to the pull API and the reference coordinator that are oversized,
//! malformed or unauthorised. Each gets a clear refusal; nothing panics, and the service
//! goes on answering.
use std::{
    os::unix::ffi::OsStrExt,
    process::{Command, Stdio},
    time::Duration,
};

use hive_monitor_tests::*;
use monitor_user::{sampler::Sampler, sources::cgroup::Slice};

const DAEMON: &str = env!("CARGO_BIN_EXE_hm-daemon");
const HM_LOAD: &str = env!("CARGO_BIN_EXE_hm-load");

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A fresh connection per request: a server refusing a body early closes the connection.
fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

fn wait_up(client: &reqwest::blocking::Client, url: &str, token: Option<&str>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut r = client.get(url);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if r.send().is_ok_and(|r| r.status().is_success()) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{url} never answered");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Checks a reply's status is one of `want`, and counts the request.
fn answered(
    tried: &mut usize,
    what: &str,
    reply: Result<reqwest::blocking::Response, reqwest::Error>,
    want: &[u16],
) {
    *tried += 1;
    let got = reply.map(|r| r.status().as_u16());
    assert!(got.as_ref().is_ok_and(|s| want.contains(s)), "{what}: {got:?}, wanted one of {want:?}");
}

#[test]
fn hostile_cgroup_names_are_skipped() {
    if !bpf_available("hostile_names") {
        return;
    }
    let cg = TestCgroup::new("hostile");
    let good = cg.mkdir("rbee.slice/llm/8080");
    let _load = Workload::start(HM_LOAD, &good, &["sleep", "60"]);
    let slice = cg.dir.join("rbee.slice");
    let long = "x".repeat(200);
    let hostile: Vec<std::path::PathBuf> = vec![
        slice.join("llm").join(&long),
        slice.join(&long).join("8080"),
        slice.join("llm").join("tab\there"),
        slice.join("llm").join(std::ffi::OsStr::from_bytes(b"\xff\xfe")),
        slice.join("llm").join("-rf *; $(reboot)"),
    ];
    for dir in &hostile {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {dir:?}: {e}"));
    }
    let mut sampler = Sampler::new(Slice::new(&cg.root, &cg.rel("rbee.slice")).unwrap()).unwrap();
    let sample = sampler.sample().expect("a sample despite hostile names");
    let names: Vec<_> =
        sample.workers.iter().map(|w| format!("{}/{}", w.cgroup.group, w.cgroup.instance)).collect();
    eprintln!("hostile names: {} tried; workers reported: {names:?}", hostile.len());
    // (The kernel itself refuses a newline in a cgroup name.) Shell metacharacters are
    // harmless in a name that is only ever data; the rest are refused.
    assert_eq!(names, ["llm/-rf *; $(reboot)", "llm/8080"]);
}

#[test]
fn the_coordinator_refuses_bad_requests_and_keeps_serving() {
    let port = free_port();
    let _queen = Child(
        Command::new(DAEMON)
            .args(["coordinator", "--listen", &format!("127.0.0.1:{port}")])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    let client = client();
    wait_up(&client, &format!("{base}/v1/hives"), None);
    let seed = include_str!("../../fuzz/seeds/heartbeat/one-worker.json");
    let post = |body: Vec<u8>| client.post(format!("{base}/v1/hive-heartbeat")).body(body).send();
    let mut tried = 0;
    let mut expect = |what: &str, reply, want: &[u16]| answered(&mut tried, what, reply, want);
    expect("5 MiB body", post(vec![b' '; 5 << 20]), &[413]);
    expect("nested 100 000 deep", post(vec![b'['; 100_000]), &[400]);
    expect("not UTF-8", post(vec![0xff; 64]), &[400]);
    expect("wrong types", post(br#"{"schema_version":"one","seq":-1}"#.to_vec()), &[400]);
    expect("truncated", post(seed.as_bytes()[..seed.len() / 2].to_vec()), &[400]);
    let future = seed.replacen("\"schema_version\":1", "\"schema_version\":99", 1);
    expect("unknown schema version", post(future.into_bytes()), &[422]);
    expect("a real heartbeat", post(seed.as_bytes().to_vec()), &[200]);
    let workers = format!("{base}/v1/workers");
    for query in [
        "min_free_vram_mb=abc",
        "min_free_vram_mb=-1",
        "min_free_vram_mb=18446744073709551616",
        "idle=maybe",
        "sort=cpu",
    ] {
        expect(query, client.get(format!("{workers}?{query}")).send(), &[400]);
    }
    // Not UTF-8 once decoded: read lossily, so it names no model served here.
    expect("model=%ff", client.get(format!("{workers}?model=%ff")).send(), &[200]);
    expect("200 KiB header", client.get(&workers).header("x-junk", "j".repeat(200 << 10)).send(), &[431]);
    expect("wrong method", client.put(format!("{base}/v1/hive-heartbeat")).body("{}").send(), &[405]);
    expect("unknown path", client.get(format!("{base}/v1/../../etc/passwd")).send(), &[404]);
    // Still serving, with the one good heartbeat.
    let hives: serde_json::Value = client.get(format!("{base}/v1/hives")).send().unwrap().json().unwrap();
    assert_eq!(hives.as_array().map(Vec::len), Some(1), "{hives}");
    eprintln!("coordinator: {tried} bad or odd requests answered as expected");
}

#[test]
fn the_pull_api_refuses_bad_requests_and_keeps_serving() {
    if !bpf_available("pull_api_bad_input") {
        return;
    }
    let cg = TestCgroup::new("pull_bad");
    cg.mkdir("rbee.slice/llm/8080");
    let port = free_port();
    let token = std::env::temp_dir().join(format!("hm-bad-token-{}", std::process::id()));
    std::fs::write(&token, "s3cret\n").unwrap();
    let root = cg.root.to_string_lossy().into_owned();
    let _daemon = Child(
        Command::new(DAEMON)
            .args(["run", "--cgroup-root", &root, "--slice", &cg.rel("rbee.slice"), "--interval", "200ms"])
            .args(["--listen", &format!("127.0.0.1:{port}"), "--api-token-file", token.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    let client = client();
    wait_up(&client, &format!("{base}/v1/heartbeat"), Some("s3cret"));
    let _ = std::fs::remove_file(&token);
    let hb = format!("{base}/v1/heartbeat");
    let mut tried = 0;
    let mut expect = |what: &str, reply, want: &[u16]| answered(&mut tried, what, reply, want);
    expect("no token", client.get(&hb).send(), &[401]);
    expect("empty bearer", client.get(&hb).header("authorization", "Bearer ").send(), &[401]);
    expect("basic auth", client.get(&hb).basic_auth("s3cret", Some("s3cret")).send(), &[401]);
    expect("a prefix of the token", client.get(&hb).bearer_auth("s3cre").send(), &[401]);
    expect("the token and more", client.get(&hb).bearer_auth("s3cret2").send(), &[401]);
    expect("10 KiB token", client.get(&hb).bearer_auth("s".repeat(10 << 10)).send(), &[401]);
    expect(
        "200 KiB header",
        client.get(&hb).bearer_auth("s3cret").header("x-junk", "j".repeat(200 << 10)).send(),
        &[431],
    );
    expect("wrong method", client.post(&hb).bearer_auth("s3cret").body("{}").send(), &[405]);
    expect("2 KiB body", client.post(&hb).bearer_auth("s3cret").body(vec![b'x'; 2048]).send(), &[405, 413]);
    expect("unknown path", client.get(format!("{base}/v1/nothing")).bearer_auth("s3cret").send(), &[404]);
    expect(
        "healthy after all that",
        client.get(format!("{base}/healthz")).bearer_auth("s3cret").send(),
        &[200],
    );
    eprintln!("pull API: {tried} bad or odd requests answered as expected");
}
