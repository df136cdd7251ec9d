//! `cargo xtask demo`: its workers appear in the daemon's heartbeats as described, and
//! every process and cgroup it started is gone after it ends, by itself or on Ctrl-C.
use std::{
    io::BufRead,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use hive_monitor_tests::*;
use serde_json::Value;

const DAEMON: &str = env!("CARGO_BIN_EXE_hm-daemon");
const WORKERS: [&str; 3] = ["llm/8080", "io/burst", "idle/1"];

/// The xtask binary, built beside this test's binaries.
fn xtask() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo).args(["build", "--quiet", "--package", "xtask"]).status().unwrap();
    assert!(status.success(), "cargo build --package xtask");
    Path::new(DAEMON).with_file_name("xtask")
}

fn demo(cg: &TestCgroup, seconds: u64) -> Command {
    let mut cmd = Command::new(xtask());
    cmd.args(["demo", "--daemon", DAEMON, "--seconds", &seconds.to_string()])
        .args(["--cgroup-root", cg.root.to_str().unwrap(), "--slice", &cg.rel("rbee.slice")])
        .args(["--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    cmd
}

/// On a hybrid host the demo's workers also get v1 memory and cpu cgroups, at the same path
/// below each hierarchy's root: the test tree is made in all three, beneath this process's
/// own cgroups.
fn test_tree() -> (TestCgroup, Vec<PathBuf>) {
    match TestCgroup::with_v1("demo", &["memory", "cpu"]) {
        Some(cg) => {
            let v1 =
                ["memory", "cpu"].iter().map(|c| Path::new("/sys/fs/cgroup").join(c).join(&cg.rel)).collect();
            (cg, v1)
        }
        None => (TestCgroup::new("demo"), Vec::new()),
    }
}

/// The demo's worker cgroups still there, in any hierarchy.
fn gone(cg: &TestCgroup, v1: &[PathBuf]) -> Vec<String> {
    std::iter::once(&cg.dir)
        .chain(v1)
        .flat_map(|tree| WORKERS.iter().map(move |w| tree.join("rbee.slice").join(w)))
        .filter(|d| d.exists())
        .map(|d| d.display().to_string())
        .collect()
}

#[test]
fn the_demo_shows_its_workers_and_leaves_no_cgroup_on_ctrl_c_or_exit() {
    if !bpf_available("demo") {
        return;
    }
    let (cg, v1) = test_tree();
    let mut child = demo(&cg, 600).spawn().unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    // Heartbeats until every demo worker is in one with the figures it is there to show.
    let mut seen = None;
    for line in lines.by_ref().take(60) {
        let hb: Value = serde_json::from_str(&line.unwrap()).unwrap();
        let find = |name: &str| {
            hb["workers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|w| {
                    format!("{}/{}", w["group"].as_str().unwrap(), w["instance"].as_str().unwrap()) == name
                })
                .cloned()
        };
        if let [Some(llm), Some(io), Some(idle)] = WORKERS.map(find) {
            if llm["model"] == "llama-3.1-8b-instruct"
                && llm["cpu_pct"].as_f64().unwrap_or(0.0) > 20.0
                && io["io_syscall_write_bytes_total"].as_u64().unwrap_or(0) > 0
            {
                seen = Some((llm, io, idle));
                break;
            }
        }
    }
    // Ctrl-C: SIGINT to the demo alone (the terminal would send it to the whole group).
    // SAFETY: a process this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    let left = gone(&cg, &v1);
    let (llm, _, idle) =
        seen.expect("a heartbeat with the busy llm/8080 and its model, and the I/O worker writing");
    assert!(idle["cpu_pct"].as_f64().is_some_and(|v| v < llm["cpu_pct"].as_f64().unwrap()), "{idle}");
    assert!(status.success(), "demo after SIGINT: {status}");
    assert!(left.is_empty(), "cgroups left after Ctrl-C: {left:?}");

    // Ended by itself.
    let out = demo(&cg, 3).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"instance\":\"burst\""));
    let left = gone(&cg, &v1);
    assert!(left.is_empty(), "cgroups left after the demo ended: {left:?}");
}
