//! The kernel matrix's checker: runs as root (as the init's child) inside a throw-away virtual
//! machine booted by `cargo xtask test-kernels`, owns the guest's whole cgroup tree, starts
//! the daemon, runs known loads in worker cgroups and compares the daemon's heartbeat figures
//! with the guest kernel's own accounting. Each check prints one line
//!
//!     HM-RESULT {"check": …, "figure": …, "monitor": …, "reference": …, "error": …,
//!                "unit": …, "bound": …, "pass": …, "note": …}
//!
//! on standard output (the serial console), and `HM-DONE` at the end. A check that panics is
//! a failed row; the others still run.
//!
//!     hm-guest [--daemon PATH] [--load PATH] [--disk DEV] [--disk-mib N] [--quick]
use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use hive_monitor_tests::{cpu_stat_ns, proc_field, sched_figures};
use serde_json::{json, Value};

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const SLICE: &str = "rbee.slice";
const GROUP: &str = "matrix";
/// A group that enables no controller below it: its workers share its memory cgroup.
const SHARED_MEMORY_GROUP: &str = "shared-memory";
/// A group that enables the memory controller below it: its workers have memory cgroups.
const OWN_MEMORY_GROUP: &str = "own-memory";
const LISTEN: &str = "127.0.0.1:7835";
const MIB: u64 = 1 << 20;

/// The accuracy target: per-interval CPU% within 0.5 percentage points of `cpu.stat`.
const CPU_BOUND_PP: f64 = 0.5;
/// Bytes within 0.1 % of the kernel's per-process figures and of what the load moved.
const IO_BOUND_PCT: f64 = 0.1;
/// Run-queue wait: 1 % of the kernel's figure or 1 ms, whichever is larger.
const RUNQ_BOUND_REL: f64 = 0.01;
const RUNQ_BOUND_NS: f64 = 1_000_000.0;
/// Processes the lifecycle worker's shell forks, each exec'ing /bin/true.
const LIFECYCLE_CHILDREN: u64 = 200;

struct Opts {
    daemon: String,
    load: String,
    disk: String,
    disk_mib: u64,
    /// Fewer and shorter intervals.
    quick: bool,
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        daemon: "/bin/hive-monitor".into(),
        load: "/bin/hm-load".into(),
        disk: "/dev/vda".into(),
        disk_mib: 32,
        quick: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--daemon" => o.daemon = val(),
            "--load" => o.load = val(),
            "--disk" => o.disk = val(),
            "--disk-mib" => o.disk_mib = val().parse().expect("--disk-mib N"),
            "--quick" => o.quick = true,
            _ => panic!("unknown argument {a}"),
        }
    }
    o
}

/// One row of the matrix.
#[derive(Default)]
struct Row {
    check: String,
    figure: String,
    monitor: Value,
    reference: Value,
    error: Option<f64>,
    unit: &'static str,
    bound: Option<f64>,
    pass: bool,
    note: String,
    /// The collector's source of the figure (`ebpf`, `cgroup`, `procfs`, …).
    source: String,
}

impl Row {
    /// A figure the daemon took from its fallback (cpu.stat, /proc) instead of the probes
    /// trivially equals the reference: the row fails, saying so.
    fn require_probes(mut self, hb: &Value, key: &str) -> Self {
        self.source = hb["collector"][key].as_str().unwrap_or("?").to_string();
        if self.source != "ebpf" {
            self.pass = false;
            self.note = format!("collector.{key} is {}, not the probes; {}", self.source, self.note);
        }
        self
    }
}

fn emit(row: &Row) {
    let v = json!({
        "check": row.check, "figure": row.figure, "monitor": row.monitor, "reference": row.reference,
        "error": row.error, "unit": row.unit, "bound": row.bound, "pass": row.pass, "note": row.note,
        "source": row.source,
    });
    // One write per line, so the console does not interleave it with kernel messages.
    let line = format!("HM-RESULT {v}\n");
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(line.as_bytes());
    let _ = out.flush();
}

fn info(msg: &str) {
    let line = format!("HM-INFO {msg}\n");
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(line.as_bytes());
    let _ = out.flush();
}

fn failed(check: &str, figure: &str, note: String) -> Row {
    Row { check: check.into(), figure: figure.into(), pass: false, note, ..Default::default() }
}

// ---------------------------------------------------------------------------------------------
// The daemon and its heartbeats (JSON lines on its standard output).

#[derive(Default)]
struct Beats {
    latest: Option<(Value, Instant)>,
    exited: bool,
}

struct Daemon {
    child: Child,
    beats: Arc<(Mutex<Beats>, Condvar)>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    fn start(exe: &str) -> std::io::Result<Self> {
        let mut child = Command::new(exe)
            .args([
                "run",
                "--cgroup-root",
                CGROUP_ROOT,
                "--slice",
                SLICE,
                "--interval",
                "1s",
                "--listen",
                LISTEN,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let beats: Arc<(Mutex<Beats>, Condvar)> = Arc::default();
        let stderr: Arc<Mutex<Vec<String>>> = Arc::default();
        let out = child.stdout.take().expect("stdout");
        let b = beats.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    b.0.lock().unwrap().latest = Some((v, Instant::now()));
                    b.1.notify_all();
                }
            }
            b.0.lock().unwrap().exited = true;
            b.1.notify_all();
        });
        let err = child.stderr.take().expect("stderr");
        let e = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                e.lock().unwrap().push(line);
            }
        });
        Ok(Self { child, beats, stderr })
    }

    /// The first heartbeat that arrives after `after` satisfying `ok`.
    fn wait(&self, timeout: Duration, ok: impl Fn(&Value, Instant) -> bool) -> Result<Value, String> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.beats;
        let mut g = lock.lock().unwrap();
        loop {
            if let Some((v, at)) = &g.latest {
                if ok(v, *at) {
                    return Ok(v.clone());
                }
            }
            if g.exited {
                return Err(format!("the daemon exited; stderr: {}", self.stderr_tail(20)));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!("no heartbeat within {timeout:?}; stderr: {}", self.stderr_tail(20)));
            }
            g = cv.wait_timeout(g, deadline - now).unwrap().0;
        }
    }

    /// A heartbeat sampled wholly after this call: the one after the first to arrive after it.
    fn fresh(&self) -> Result<Value, String> {
        let t = Instant::now();
        let first = self.wait(Duration::from_secs(20), |_, at| at > t)?;
        let seq = first["seq"].as_u64().unwrap_or(0);
        self.wait(Duration::from_secs(20), |v, _| v["seq"].as_u64().unwrap_or(0) > seq)
    }

    fn stderr_tail(&self, n: usize) -> String {
        let lines = self.stderr.lock().unwrap();
        lines[lines.len().saturating_sub(n)..].join(" | ")
    }

    fn stop(mut self) {
        // SAFETY: our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn worker<'a>(hb: &'a Value, instance: &str) -> Result<&'a Value, String> {
    worker_in(hb, GROUP, instance)
}

fn worker_in<'a>(hb: &'a Value, group: &str, instance: &str) -> Result<&'a Value, String> {
    hb["workers"]
        .as_array()
        .and_then(|ws| ws.iter().find(|w| w["group"] == group && w["instance"] == instance))
        .ok_or_else(|| format!("worker {group}/{instance} missing from the heartbeat"))
}

/// The collector's sources in a few words: `cpu cgroup, runq unavailable, …`.
fn sources(hb: &Value) -> String {
    let c = hb["collector"].as_object().cloned().unwrap_or_default();
    let parts: Vec<String> = c
        .iter()
        .filter_map(|(k, v)| Some(format!("{k} {}", v.as_str()?)))
        .filter(|p| !p.starts_with("gpu "))
        .collect();
    format!("collector: {}", parts.join(", "))
}

fn figure(hb: &Value, instance: &str, name: &str) -> Result<u64, String> {
    let w = worker(hb, instance)?;
    w[name].as_u64().ok_or_else(|| format!("{name} is {} ({})", w[name], sources(hb)))
}

// ---------------------------------------------------------------------------------------------
// Worker cgroups and loads.

fn worker_dir(instance: &str) -> PathBuf {
    Path::new(CGROUP_ROOT).join(SLICE).join(GROUP).join(instance)
}

/// The slice and group with the controllers the daemon reads enabled below them.
fn make_tree() {
    let mut dir = PathBuf::from(CGROUP_ROOT);
    for part in [SLICE, GROUP] {
        let available = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
        for c in ["cpu", "memory", "io", "pids"] {
            if available.split_whitespace().any(|a| a == c) {
                let _ = std::fs::write(dir.join("cgroup.subtree_control"), format!("+{c}"));
            }
        }
        dir.push(part);
        let _ = std::fs::create_dir(&dir);
    }
}

/// A process started with its first instruction inside a worker cgroup; killed with all the
/// worker holds when dropped.
struct Load {
    child: Child,
    dir: PathBuf,
}

impl Load {
    fn start(instance: &str, exe: &str, args: &[&str], cpu: Option<usize>) -> std::io::Result<Self> {
        Self::start_at(worker_dir(instance), exe, args, cpu)
    }

    fn start_at(dir: PathBuf, exe: &str, args: &[&str], cpu: Option<usize>) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        let mut cmd = hive_monitor_tests::command_in(exe, &[&dir], args);
        if let Some(cpu) = cpu {
            hive_monitor_tests::pin_to_cpu(&mut cmd, cpu);
        }
        let child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn()?;
        Ok(Self { child, dir })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails when the load has already exited (e.g. it could not open its file).
    fn alive(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(format!("the load exited early: {status}")),
            _ => Ok(()),
        }
    }

    fn stdin(&mut self) -> Option<ChildStdin> {
        self.child.stdin.take()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        kill_cgroup(&self.dir);
    }
}

/// Kills whatever runs in `dir` (cgroup.kill from 5.14; SIGKILL to each process before).
fn kill_cgroup(dir: &Path) {
    let _ = std::fs::write(dir.join("cgroup.freeze"), "0");
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        let pids: Vec<i32> = procs.lines().filter_map(|l| l.trim().parse().ok()).collect();
        if pids.is_empty() || Instant::now() > deadline {
            break;
        }
        for pid in pids {
            // SAFETY: processes of a worker this checker started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Reap any orphan that init (the shell running us) has not reaped yet: not our business.
}

/// Freezes the worker and waits until its CPU time is charged (as the host tests do).
fn freeze(dir: &Path) -> Instant {
    hive_monitor_tests::freeze(dir);
    Instant::now()
}

fn thaw(dir: &Path) {
    hive_monitor_tests::thaw(dir);
}

// ---------------------------------------------------------------------------------------------
// The checks.

fn check_probes(d: &Daemon) -> Vec<Row> {
    let hb = match d.wait(Duration::from_secs(60), |_, _| true) {
        Ok(hb) => hb,
        Err(e) => return vec![failed("probes", "collector.programs", e)],
    };
    let c = &hb["collector"];
    info(&format!(
        "collector sources: cpu {} runq {} io_syscall {} io_read {} io_write {}",
        c["cpu"], c["runq"], c["io_syscall"], c["io_read"], c["io_write"]
    ));
    let mut rows = Vec::new();
    let programs = &c["programs"];
    let mut row = Row { check: "probes".into(), figure: "collector.programs".into(), ..Default::default() };
    match programs.as_object() {
        None => {
            row.note = format!(
                "collector.programs is {programs} (a daemon without it?); collector.cpu is {}",
                c["cpu"]
            );
        }
        Some(map) => {
            let bad: Vec<String> = map
                .iter()
                .filter(|(_, v)| v.as_str() != Some("attached"))
                .map(|(k, v)| format!("{k}: {}", v.as_str().unwrap_or(&v.to_string())))
                .collect();
            row.monitor = json!(format!("{}/{} attached", map.len() - bad.len(), map.len()));
            row.pass = !map.is_empty() && bad.is_empty();
            row.note = if map.is_empty() { "no programs listed".into() } else { bad.join("; ") };
        }
    }
    row.reference = json!("all attached");
    rows.push(row);

    let missing = &c["missing"];
    let mut row = Row {
        check: "probes".into(),
        figure: "collector.missing".into(),
        reference: json!("{}"),
        ..Default::default()
    };
    match missing.as_object() {
        None => row.note = format!("collector.missing is {missing} (a daemon without it?)"),
        Some(map) => {
            row.monitor = json!(map.len());
            row.pass = map.is_empty();
            row.note = map
                .iter()
                .map(|(k, v)| format!("{k}: {}", v.as_str().unwrap_or(&v.to_string())))
                .collect::<Vec<_>>()
                .join("; ");
        }
    }
    rows.push(row);
    if rows.iter().any(|r| !r.pass) {
        for line in d.stderr.lock().unwrap().iter().take(200) {
            info(&format!("daemon stderr: {line}"));
        }
    }
    rows
}

/// CPU time over frozen-to-frozen intervals against the worker's cpu.stat: the worst
/// interval's error in percentage points of one CPU.
fn check_cpu(d: &Daemon, o: &Opts, instance: &str, args: &[&str]) -> Result<Row, String> {
    let check = format!("cpu {instance}");
    let mut load = Load::start(instance, &o.load, args, None).map_err(|e| e.to_string())?;
    let dir = load.dir.clone();
    std::thread::sleep(Duration::from_millis(500));
    load.alive()?;
    let mut at = freeze(&dir);
    let mut theirs = cpu_stat_ns(&dir);
    let mut hb = d.fresh()?;
    let mut ours = figure(&hb, instance, "cpu_ns_total")?;
    thaw(&dir);
    let intervals = if o.quick { 1 } else { 3 };
    let (mut worst, mut sum_ours, mut sum_theirs, mut sum_wall) = (0.0f64, 0u64, 0u64, 0.0);
    let mut notes = Vec::new();
    for _ in 0..intervals {
        std::thread::sleep(Duration::from_millis(2500));
        let now = freeze(&dir);
        let t = cpu_stat_ns(&dir);
        hb = d.fresh()?;
        let m = figure(&hb, instance, "cpu_ns_total")?;
        thaw(&dir);
        let wall = (now - at).as_nanos() as f64;
        let (dm, dt) = (m.wrapping_sub(ours), t - theirs);
        let error = (dm as f64 - dt as f64).abs() / wall * 100.0;
        notes.push(format!("{:.2}/{:.2}%", dm as f64 / wall * 100.0, dt as f64 / wall * 100.0));
        worst = worst.max(error);
        (sum_ours, sum_theirs, sum_wall) = (sum_ours + dm, sum_theirs + dt, sum_wall + wall);
        (at, theirs, ours) = (now, t, m);
    }
    load.alive()?;
    let busy = sum_theirs as f64 / sum_wall * 100.0;
    let mut pass = worst <= CPU_BOUND_PP;
    let mut note = format!("per interval monitor/cpu.stat {}", notes.join(" "));
    if busy < 10.0 {
        pass = false;
        note = format!("the load used only {busy:.1} % of a CPU; {note}");
    }
    Ok(Row {
        check,
        figure: "cpu_ns_total".into(),
        monitor: json!(sum_ours),
        reference: json!(sum_theirs),
        error: Some(worst),
        unit: "pp",
        bound: Some(CPU_BOUND_PP),
        pass,
        note,
        ..Default::default()
    }
    .require_probes(&hb, "cpu"))
}

fn rel_error_pct(ours: u64, theirs: u64) -> f64 {
    if theirs == 0 {
        if ours == 0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        ours.abs_diff(theirs) as f64 / theirs as f64 * 100.0
    }
}

/// A byte counter against the process's /proc/<pid>/io field and the bytes the load moved:
/// the larger of the two relative errors.
fn bytes_row(check: &str, figure: &str, ours: u64, proc_name: &str, proc_value: u64, moved: u64) -> Row {
    let error = rel_error_pct(ours, proc_value).max(rel_error_pct(ours, moved));
    Row {
        check: check.into(),
        figure: figure.into(),
        monitor: json!(ours),
        reference: json!(proc_value),
        error: Some(error),
        unit: "%",
        bound: Some(IO_BOUND_PCT),
        pass: error <= IO_BOUND_PCT,
        note: format!("{proc_name} {proc_value}, moved {moved}"),
        ..Default::default()
    }
}

/// Waits until an `alloc` load holds its `mib` MiB.
fn wait_resident(load: &mut Load, mib: u64) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while proc_field(load.pid(), "status", "VmRSS:") < mib * 1024 {
        load.alive()?;
        if Instant::now() > deadline {
            return Err(format!("the load did not touch its {mib} MiB within 60 s"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// A worker whose cgroup has no memory controller of its own (its group does not enable
/// one below it), so its memory is summed over its processes by the task iterator: the
/// heartbeat's figures against the load's `/proc/<pid>/status`, kind by kind, exactly (the
/// load holds its memory still).
fn check_memory(d: &Daemon, o: &Opts) -> Result<Vec<Row>, String> {
    let mib = if o.quick { 16 } else { 64 };
    let group = Path::new(CGROUP_ROOT).join(SLICE).join(SHARED_MEMORY_GROUP);
    let mut load = Load::start_at(group.join("1"), &o.load, &["alloc", &mib.to_string(), "600"], None)
        .map_err(|e| e.to_string())?;
    wait_resident(&mut load, mib)?;
    let hb = d.fresh()?;
    let status = |field: &str| proc_field(load.pid(), "status", field) * 1024;
    let w = worker_in(&hb, SHARED_MEMORY_GROUP, "1")?;
    let memory = &w["memory"];
    let source = memory["source"].as_str().unwrap_or("?").to_string();
    let row = |figure: &str, reference: u64, note: &str| {
        let ours = memory[figure].as_u64();
        let error = ours.map(|v| v.abs_diff(reference) as f64);
        let mut row = Row {
            check: "memory of processes".into(),
            figure: format!("memory.{figure}"),
            monitor: json!(ours),
            reference: json!(reference),
            error,
            unit: " B",
            bound: Some(0.0),
            pass: error == Some(0.0) && source == "ebpf",
            note: note.into(),
            source: source.clone(),
        };
        if source != "ebpf" {
            row.note = format!("memory.source is {source}, not the probes; {}", row.note);
        }
        row
    };
    Ok(vec![
        row("current_bytes", status("VmRSS:"), "VmRSS"),
        row("anon_bytes", status("RssAnon:"), "RssAnon"),
        row("file_bytes", status("RssFile:") + status("RssShmem:"), "RssFile + RssShmem"),
    ])
}

/// A worker with a memory cgroup of its own (its group enables the controller below it), a
/// limit set and its memory held still: the heartbeat's figures, which the task iterator
/// read from the cgroup's counters, against the cgroup's files read just before the sample
/// and just after it. A figure passes when it equals either (a CPU's charge cache, drained
/// when another cgroup charges on that CPU, can move `memory.current` in between).
fn check_memory_cgroup(d: &Daemon, o: &Opts) -> Result<Vec<Row>, String> {
    let mib = if o.quick { 16 } else { 64 };
    let group = Path::new(CGROUP_ROOT).join(SLICE).join(OWN_MEMORY_GROUP);
    std::fs::create_dir_all(&group).map_err(|e| e.to_string())?;
    std::fs::write(group.join("cgroup.subtree_control"), "+memory")
        .map_err(|e| format!("enabling memory below {}: {e}", group.display()))?;
    let dir = group.join("1");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let limit = 4 * mib * MIB;
    std::fs::write(dir.join("memory.max"), limit.to_string()).map_err(|e| format!("memory.max: {e}"))?;
    let mut load = Load::start_at(dir.clone(), &o.load, &["alloc", &mib.to_string(), "600"], None)
        .map_err(|e| e.to_string())?;
    wait_resident(&mut load, mib)?;
    let files = || -> [(&str, &str, Option<u64>); 4] {
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
        let oom_kill = |t: String| {
            t.lines().find_map(|l| l.strip_prefix("oom_kill ")).and_then(|v| v.trim().parse().ok())
        };
        [
            ("current_bytes", "memory.current", read("memory.current").and_then(|t| t.trim().parse().ok())),
            // memory.peak appeared in 5.19.
            ("peak_bytes", "memory.peak", read("memory.peak").and_then(|t| t.trim().parse().ok())),
            ("limit_bytes", "memory.max", read("memory.max").and_then(|t| t.trim().parse().ok())),
            ("oom_kills", "memory.events oom_kill", read("memory.events").and_then(oom_kill)),
        ]
    };
    let before = files();
    let hb = d.fresh()?;
    let after = files();
    let w = worker_in(&hb, OWN_MEMORY_GROUP, "1")?;
    let memory = &w["memory"];
    let source = memory["source"].as_str().unwrap_or("?").to_string();
    let row = |figure: &str, ours: Option<u64>, reference: u64, pass: bool, note: String| Row {
        check: "memory cgroup".into(),
        figure: format!("memory.{figure}"),
        monitor: json!(ours),
        reference: json!(reference),
        error: ours.map(|v| v.abs_diff(reference) as f64),
        unit: " B",
        bound: Some(0.0),
        pass: pass && source == "cgroup",
        note: if source == "cgroup" { note } else { format!("memory.source is {source}; {note}") },
        source: source.clone(),
    };
    let mut rows = Vec::new();
    for ((figure, file, was), (_, _, now)) in before.iter().zip(after) {
        let ours = memory[*figure].as_u64();
        let Some((was, now)) = was.zip(now) else {
            // Only memory.peak may be absent (before 5.19): the heartbeat then has the
            // kernel's watermark, which only the counters the iterator read can give.
            let current = memory["current_bytes"].as_u64().unwrap_or(u64::MAX);
            let pass = *figure == "peak_bytes" && ours.is_some_and(|p| p >= current);
            rows.push(row(
                figure,
                ours,
                current,
                pass,
                format!("no {file} file: the watermark, at least memory.current"),
            ));
            continue;
        };
        let reference = if ours == Some(was) { was } else { now };
        let note = match was == now {
            true => file.to_string(),
            false => format!("{file} read {was} before the sample, {now} after"),
        };
        rows.push(row(figure, ours, reference, ours == Some(reference), note));
    }
    Ok(rows)
}

/// Waits until the load's /proc/<pid>/io fields reach `want`, then a moment more (idle).
fn wait_io(load: &mut Load, want: &[(&str, u64)], timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        load.alive()?;
        if want.iter().all(|(f, n)| proc_field(load.pid(), "io", f) >= *n) {
            break;
        }
        if Instant::now() > deadline {
            let now: Vec<String> =
                want.iter().map(|(f, _)| format!("{f} {}", proc_field(load.pid(), "io", f))).collect();
            return Err(format!("the load did not finish within {timeout:?}: {}", now.join(", ")));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    Ok(())
}

fn check_syscall_io(d: &Daemon, o: &Opts) -> Result<Vec<Row>, String> {
    let mib = if o.quick { 8 } else { 32 };
    let moved = mib * MIB;
    let mut load = Load::start("rw", &o.load, &["rw", "/tmp/hm-rw", &mib.to_string(), "600"], None)
        .map_err(|e| e.to_string())?;
    wait_io(&mut load, &[("rchar:", moved), ("wchar:", moved)], Duration::from_secs(120))?;
    let hb = d.fresh()?;
    let (rchar, wchar) = (proc_field(load.pid(), "io", "rchar:"), proc_field(load.pid(), "io", "wchar:"));
    let w = figure(&hb, "rw", "io_syscall_write_bytes_total")?;
    let r = figure(&hb, "rw", "io_syscall_read_bytes_total")?;
    let _ = std::fs::remove_file("/tmp/hm-rw");
    Ok(vec![
        bytes_row("syscall write", "io_syscall_write_bytes_total", w, "wchar", wchar, moved)
            .require_probes(&hb, "io_syscall"),
        bytes_row("syscall read", "io_syscall_read_bytes_total", r, "rchar", rchar, moved)
            .require_probes(&hb, "io_syscall"),
    ])
}

/// O_DIRECT write then read of the whole raw disk.
fn check_direct(d: &Daemon, o: &Opts) -> Result<Vec<Row>, String> {
    let moved = o.disk_mib * MIB;
    let mut load = Load::start("direct", &o.load, &["direct", &o.disk, &o.disk_mib.to_string(), "600"], None)
        .map_err(|e| e.to_string())?;
    wait_io(&mut load, &[("read_bytes:", moved), ("write_bytes:", moved)], Duration::from_secs(120))?;
    let hb = d.fresh()?;
    let (rb, wb) =
        (proc_field(load.pid(), "io", "read_bytes:"), proc_field(load.pid(), "io", "write_bytes:"));
    let w = figure(&hb, "direct", "io_write_bytes_total")?;
    let r = figure(&hb, "direct", "io_read_bytes_total")?;
    Ok(vec![
        bytes_row("storage direct write", "io_write_bytes_total", w, "write_bytes", wb, moved)
            .require_probes(&hb, "io_write"),
        bytes_row("storage direct read", "io_read_bytes_total", r, "read_bytes", rb, moved)
            .require_probes(&hb, "io_read"),
    ])
}

/// Buffered write of the raw disk + fsync: counted when dirtied.
fn check_writesync(d: &Daemon, o: &Opts) -> Result<Vec<Row>, String> {
    let moved = o.disk_mib * MIB;
    let mut load =
        Load::start("writesync", &o.load, &["writesync", &o.disk, &o.disk_mib.to_string(), "600"], None)
            .map_err(|e| e.to_string())?;
    wait_io(&mut load, &[("write_bytes:", moved)], Duration::from_secs(120))?;
    // fsync done: wchar stops at the bytes written; give the load time to reach its sleep.
    std::thread::sleep(Duration::from_millis(500));
    let hb = d.fresh()?;
    let wb = proc_field(load.pid(), "io", "write_bytes:");
    let w = figure(&hb, "writesync", "io_write_bytes_total")?;
    Ok(vec![bytes_row("storage buffered+fsync", "io_write_bytes_total", w, "write_bytes", wb, moved)
        .require_probes(&hb, "io_write")])
}

/// Two spinning threads pinned to CPU 0: run-queue wait against Σ schedstat run_delay.
fn check_runq(d: &Daemon, o: &Opts) -> Result<Row, String> {
    let mut load = Load::start("runq", &o.load, &["busy", "2", "600"], Some(0)).map_err(|e| e.to_string())?;
    let dir = load.dir.clone();
    std::thread::sleep(Duration::from_millis(500));
    load.alive()?;
    freeze(&dir);
    let k0 = sched_figures(load.pid()).0;
    let m0 = figure(&d.fresh()?, "runq", "runq_wait_ns_total")?;
    thaw(&dir);
    std::thread::sleep(Duration::from_millis(if o.quick { 1500 } else { 3000 }));
    freeze(&dir);
    let k1 = sched_figures(load.pid()).0;
    let hb = d.fresh()?;
    let m1 = figure(&hb, "runq", "runq_wait_ns_total")?;
    thaw(&dir);
    load.alive()?;
    let (ours, theirs) = (m1.wrapping_sub(m0), k1 - k0);
    let diff = ours.abs_diff(theirs) as f64;
    let bound = (theirs as f64 * RUNQ_BOUND_REL).max(RUNQ_BOUND_NS);
    let mut note = format!("Δ monitor {ours} ns, Δ Σ run_delay {theirs} ns, bound {bound:.0} ns");
    let mut pass = diff <= bound;
    if theirs < 100_000_000 {
        pass = false;
        note = format!("the load did not queue; {note}");
    }
    Ok(Row {
        check: "runq wait pinned".into(),
        figure: "runq_wait_ns_total".into(),
        monitor: json!(ours),
        reference: json!(theirs),
        error: Some(if theirs > 0 { diff / theirs as f64 * 100.0 } else { f64::INFINITY }),
        unit: "%",
        bound: Some(bound / theirs.max(1) as f64 * 100.0),
        pass,
        note,
        ..Default::default()
    }
    .require_probes(&hb, "runq"))
}

/// busybox sh runs /bin/true K times: each is a fork whose child execs /bin/true and exits.
/// The shell itself is exec'd inside the worker (forked outside it). Expected: K forks, K + 1
/// execs, K exits (the shell is still waiting on its standard input).
fn check_lifecycle(d: &Daemon, o: &Opts) -> Result<Vec<Row>, String> {
    let k = if o.quick { 50 } else { LIFECYCLE_CHILDREN };
    let script = format!("i=0; while [ $i -lt {k} ]; do /bin/true; i=$((i+1)); done; echo done; read x");
    let mut load = Load::start("lifecycle", "/bin/sh", &["-c", &script], None).map_err(|e| e.to_string())?;
    let stdin = load.stdin();
    let out = load.child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(out).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(120)).map_err(|_| "the shell did not finish its loop")?;
    if line.trim() != "done" {
        return Err(format!("the shell said {line:?}"));
    }
    let hb = d.fresh()?;
    drop(stdin);
    let expected = [("processes_forked_total", k), ("execs_total", k + 1), ("processes_exited_total", k)];
    let mut rows = Vec::new();
    for (name, want) in expected {
        let got = figure(&hb, "lifecycle", name);
        let (monitor, pass, note) = match got {
            Ok(n) => (json!(n), n == want, String::new()),
            Err(e) => (Value::Null, false, e),
        };
        rows.push(Row {
            check: "lifecycle".into(),
            figure: name.into(),
            monitor,
            reference: json!(want),
            error: None,
            unit: "",
            bound: Some(0.0),
            pass,
            note,
            ..Default::default()
        });
    }
    Ok(rows)
}

/// Runs a check; a panic in it (a freeze that never completes, a missing file) is its error.
fn guarded<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into());
        Err(format!("panicked: {msg}"))
    })
}

fn main() {
    let o = parse_opts();
    let started = Instant::now();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    info(&format!(
        "kernel {} btf {} cpus {}",
        release.trim(),
        Path::new("/sys/kernel/btf/vmlinux").exists(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    ));
    make_tree();
    let daemon = match Daemon::start(&o.daemon) {
        Ok(d) => d,
        Err(e) => {
            emit(&failed("probes", "collector.programs", format!("cannot start {}: {e}", o.daemon)));
            println!("HM-DONE");
            return;
        }
    };
    let timed = |name: &str, t: Instant| info(&format!("{name} took {:.1} s", t.elapsed().as_secs_f64()));

    let t = Instant::now();
    for row in check_probes(&daemon) {
        emit(&row);
    }
    timed("probes", t);
    for (instance, args) in [("busy", &["busy", "1", "600"][..]), ("forker", &["forker", "600"][..])] {
        let t = Instant::now();
        let check = format!("cpu {instance}");
        match guarded(|| check_cpu(&daemon, &o, instance, args)) {
            Ok(row) => emit(&row),
            Err(e) => emit(&failed(&check, "cpu_ns_total", e)),
        }
        timed(&check, t);
    }
    type Check = fn(&Daemon, &Opts) -> Result<Vec<Row>, String>;
    let checks: [(&str, &str, Check); 7] = [
        ("memory of processes", "memory.*_bytes", check_memory),
        ("memory cgroup", "memory.*", check_memory_cgroup),
        ("syscall io", "io_syscall_*_bytes_total", check_syscall_io),
        ("storage direct", "io_*_bytes_total", check_direct),
        ("storage buffered+fsync", "io_write_bytes_total", check_writesync),
        ("runq wait pinned", "runq_wait_ns_total", |d, o| check_runq(d, o).map(|r| vec![r])),
        ("lifecycle", "processes_*_total", check_lifecycle),
    ];
    for (check, fig, f) in checks {
        let t = Instant::now();
        match guarded(|| f(&daemon, &o)) {
            Ok(rows) => rows.iter().for_each(emit),
            Err(e) => emit(&failed(check, fig, e)),
        }
        timed(check, t);
    }
    daemon.stop();
    info(&format!("checks took {:.1} s", started.elapsed().as_secs_f64()));
    println!("HM-DONE");
}
