//! `hive-monitor spawn`: the worker's processes are in its cgroups from their first
//! instruction, limits reach the cgroup files, status and signals pass through, bad input is
//! refused clearly, and the cgroups are gone when the worker exits.
use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use hive_monitor_tests::*;

const DAEMON: &str = env!("CARGO_BIN_EXE_hm-daemon");

/// A test tree in v2 and, on a hybrid host, the v1 memory and cpu hierarchies.
fn tree(name: &str) -> Option<(TestCgroup, Vec<PathBuf>)> {
    if !bpf_available(name) {
        return None;
    }
    let cg = TestCgroup::with_v1(name, &["memory", "cpu"]).expect("a test path beneath our own cgroups");
    let v1 = ["memory", "cpu"].iter().map(|c| Path::new("/sys/fs/cgroup").join(c).join(&cg.rel)).collect();
    Some((cg, v1))
}

fn spawn(cg: &TestCgroup, args: &[&str]) -> Command {
    let mut cmd = Command::new(DAEMON);
    cmd.args(["spawn", "--cgroup-root", cg.root.to_str().unwrap(), "--slice", &cg.rel("rbee.slice")])
        .args(args);
    cmd.stdin(Stdio::null());
    cmd
}

fn output(mut cmd: Command) -> Output {
    cmd.output().expect("run hive-monitor spawn")
}

#[test]
fn the_command_runs_in_its_cgroups_from_the_start() {
    let Some((cg, v1)) = tree("spawn_cgroups") else { return };
    // `cat` is the command itself: what it prints is where its first instruction ran.
    let out = output(spawn(&cg, &["--group", "llm", "--instance", "8080", "--", "cat", "/proc/self/cgroup"]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let worker = format!("/{}/llm/8080", cg.rel("rbee.slice"));
    let line = |prefix: &str| {
        stdout.lines().find(|l| l.contains(prefix)).unwrap_or_else(|| panic!("{prefix} in {stdout}"))
    };
    assert_eq!(line("0::"), format!("0::{worker}"));
    assert!(line(":memory:").ends_with(&format!(":memory:{worker}")), "{stdout}");
    assert!(line(":cpu:").ends_with(&format!(":cpu:{worker}")), "{stdout}");
    // Removed with the worker, in every hierarchy; the group it created too.
    for dir in
        std::iter::once(cg.dir.join("rbee.slice/llm")).chain(v1.iter().map(|d| d.join("rbee.slice/llm")))
    {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}

#[test]
fn limits_reach_the_cgroup_files() {
    let Some((cg, v1)) = tree("spawn_limits") else { return };
    let out = output(spawn(
        &cg,
        &[
            "--group",
            "llm",
            "--instance",
            "1",
            "--memory-max",
            "64M",
            "--cpu-max",
            "0.5",
            "--keep",
            "--",
            "true",
        ],
    ));
    assert!(out.status.success(), "{out:?}");
    let read = |p: PathBuf| std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let v2 = cg.dir.join("rbee.slice/llm/1");
    let memory = match read(v2.join("cgroup.controllers")).contains("memory") {
        true => read(v2.join("memory.max")),
        false => read(v1[0].join("rbee.slice/llm/1/memory.limit_in_bytes")),
    };
    assert_eq!(memory.trim(), (64 << 20).to_string());
    if read(v2.join("cgroup.controllers")).contains("cpu") {
        assert_eq!(read(v2.join("cpu.max")).trim(), "50000 100000");
    } else {
        let cpu = v1[1].join("rbee.slice/llm/1");
        assert_eq!(read(cpu.join("cpu.cfs_quota_us")).trim(), "50000");
        assert_eq!(read(cpu.join("cpu.cfs_period_us")).trim(), "100000");
    }
}

#[test]
fn exit_status_and_signals_pass_through() {
    let Some((cg, _v1)) = tree("spawn_status") else { return };
    let out = output(spawn(&cg, &["--group", "g", "--instance", "exit7", "--", "sh", "-c", "exit 7"]));
    assert_eq!(out.status.code(), Some(7), "{out:?}");

    let mut child =
        spawn(&cg, &["--group", "g", "--instance", "sleeper", "--", "sleep", "30"]).spawn().unwrap();
    let worker = cg.dir.join("rbee.slice/g/sleeper");
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(worker.join("cgroup.procs")).map_or(true, |p| p.trim().is_empty()) {
        assert!(Instant::now() < deadline, "the worker never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: plain kill(2) on the pid of a child this test spawned and has not yet waited for.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(128 + libc::SIGTERM),
        "SIGTERM reaches the command, whose death is the status"
    );
    assert!(!worker.exists(), "worker cgroup left behind");
}

#[test]
fn runs_as_another_user() {
    let Some((cg, _v1)) = tree("spawn_user") else { return };
    let out = output(spawn(&cg, &["--group", "g", "--instance", "u", "--user", "nobody", "--", "id", "-u"]));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "65534");
}

#[test]
fn bad_input_is_refused_clearly() {
    let Some((cg, _v1)) = tree("spawn_refuse") else { return };
    let stderr = |out: &Output| String::from_utf8_lossy(&out.stderr).into_owned();

    for (group, instance, what) in
        [("..", "1", "group"), ("g", "a/b", "instance"), ("g", &"x".repeat(65), "instance")]
    {
        let out = output(spawn(&cg, &["--group", group, "--instance", instance, "--", "true"]));
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(stderr(&out).contains(&format!("invalid {what} name")), "{}", stderr(&out));
    }

    cg.mkdir("rbee.slice/g/taken");
    let out = output(spawn(&cg, &["--group", "g", "--instance", "taken", "--", "true"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));
    assert!(cg.dir.join("rbee.slice/g/taken").exists(), "an existing instance is left alone");

    let out =
        output(spawn(&cg, &["--group", "g", "--instance", "u", "--user", "no-such-user-hm", "--", "true"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("unknown user \"no-such-user-hm\""), "{}", stderr(&out));

    let out = output(spawn(&cg, &["--group", "g", "--instance", "m", "--memory-max", "lots", "--", "true"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("not a size"), "{}", stderr(&out));

    let out = output(spawn(&cg, &["--group", "g", "--instance", "nocmd", "--", "/nonexistent/cmd"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("cannot start"), "{}", stderr(&out));
    assert!(!cg.dir.join("rbee.slice/g/nocmd").exists(), "a worker that never started is removed");
}
