//! The benchmark `cargo xtask bench` runs: what the monitor costs and how accurate it is,
//! each measured side by side with its baseline, printed as tables and written as JSON.
//!
//!   hm-bench --daemon BIN --load BIN --out FILE --scratch DIR
//!
//! Every cgroup it makes is below its own (`TestCgroup`) and removed before it exits.
use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use hive_monitor_tests::{command_in, cpu_stat_ns, freeze, proc_field, thaw, TestCgroup, Workload};
use monitor_user::{
    probes::ProgramStats,
    sampler::{Sampler, WorkerSample},
    sources::cgroup::Slice,
};
use serde_json::{json, Value};

const STORM_ROUNDS: usize = 7;
const STORM_MS: u64 = 2000;
const DAEMON_WORKERS: [usize; 3] = [10, 100, 1000];
/// Heartbeats at 1 Hz per daemon run; the first two (start-up) are left out of the cost.
const DAEMON_BEATS: usize = 14;
const MIB: u64 = 1 << 20;

struct Args {
    daemon: String,
    load: String,
    out: PathBuf,
    scratch: PathBuf,
}

fn args() -> Args {
    let mut a = std::env::args().skip(1);
    let (mut daemon, mut load, mut out, mut scratch) = (None, None, None, None);
    while let Some(flag) = a.next() {
        let value = a.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--daemon" => daemon = Some(value),
            "--load" => load = Some(value),
            "--out" => out = Some(PathBuf::from(value)),
            "--scratch" => scratch = Some(PathBuf::from(value)),
            _ => usage(),
        }
    }
    match (daemon, load, out, scratch) {
        (Some(daemon), Some(load), Some(out), Some(scratch)) => Args { daemon, load, out, scratch },
        _ => usage(),
    }
}

fn usage() -> ! {
    eprintln!("usage: hm-bench --daemon BIN --load BIN --out FILE --scratch DIR");
    std::process::exit(2)
}

fn main() {
    let args = args();
    std::fs::create_dir_all(&args.scratch).expect("scratch directory");
    let started = Instant::now();
    let report = json!({
        "ebpf_cost": ebpf_cost(&args),
        "storm": storm(&args),
        "daemon": daemon_cost(&args),
        "cpu_accuracy": cpu_accuracy(&args),
        "io_accuracy": io_accuracy(&args),
        "seconds": started.elapsed().as_secs(),
    });
    let left = leftover_cgroups();
    println!("\ncgroups left behind: {left}; took {} s", started.elapsed().as_secs());
    let mut report = report;
    report["cgroups_left"] = json!(left);
    std::fs::write(&args.out, serde_json::to_string_pretty(&report).unwrap()).expect("write the report");
    println!("figures written to {}", args.out.display());
    if left > 0 {
        std::process::exit(1);
    }
}

fn slice_sampler(cg: &TestCgroup) -> Sampler {
    cg.mkdir("rbee.slice");
    Sampler::new(Slice::new(&cg.root, &cg.rel("rbee.slice")).unwrap()).expect("load the probes")
}

fn pingpong(load: &str, cgroup: Option<&Path>, ms: u64) -> f64 {
    let own;
    let cgroup = match cgroup {
        Some(c) => c,
        None => {
            own = own_v2_dir();
            &own
        }
    };
    let out = command_in(load, &[cgroup], &["pingpong", &ms.to_string()]).output().expect("pingpong");
    String::from_utf8_lossy(&out.stdout).trim().parse().expect("round trips per second")
}

/// This process's own v2 cgroup directory: a storm run "outside the slice" stays in it.
fn own_v2_dir() -> PathBuf {
    let root = monitor_user::sources::cgroup::detect_root().expect("cgroup2 root");
    let text = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
    let rel = text.lines().find_map(|l| l.strip_prefix("0::")).expect("a v2 entry");
    root.join(rel.trim_start_matches('/'))
}

/// Restores `kernel.bpf_stats_enabled` when dropped.
struct BpfStats(String);

impl BpfStats {
    const PATH: &str = "/proc/sys/kernel/bpf_stats_enabled";
    fn enable() -> Self {
        let was = std::fs::read_to_string(Self::PATH).expect("read bpf_stats_enabled").trim().to_string();
        std::fs::write(Self::PATH, "1").expect("enable bpf_stats");
        Self(was)
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, &self.0);
    }
}

fn delta(before: &[ProgramStats], after: &[ProgramStats]) -> Vec<(String, u64, u64)> {
    let mut rows: Vec<_> = after
        .iter()
        .map(|a| {
            let b = before.iter().find(|b| b.name == a.name).cloned().unwrap_or_default();
            (a.name.clone(), a.run_count - b.run_count, a.run_time_ns - b.run_time_ns)
        })
        .collect();
    rows.sort();
    rows
}

fn ebpf_cost(args: &Args) -> Value {
    println!("\n== eBPF cost per event (kernel.bpf_stats_enabled; includes its own clock reads)");
    let cg = TestCgroup::new("bench_ebpf");
    let sampler = slice_sampler(&cg);
    let worker = cg.mkdir("rbee.slice/bench/storm");
    let probes = sampler.probes().expect("probes loaded");
    let _stats = BpfStats::enable();
    let mut phases = Vec::new();
    for (phase, cgroup) in
        [("storm outside the slice", None), ("storm inside the slice", Some(worker.as_path()))]
    {
        let before = probes.program_stats().expect("program stats");
        pingpong(&args.load, cgroup, 3000);
        phases.push((phase, delta(&before, &probes.program_stats().expect("program stats"))));
    }
    println!("{:<24} {:>28} {:>28}", "program", phases[0].0, phases[1].0);
    let mut out = Vec::new();
    for (i, (name, ..)) in phases[0].1.iter().enumerate() {
        let cell = |p: usize| {
            let (_, n, ns) = &phases[p].1[i];
            (*n, (*n > 0).then(|| *ns as f64 / *n as f64))
        };
        let ((n0, m0), (n1, m1)) = (cell(0), cell(1));
        let fmt = |n: u64, m: Option<f64>| match m {
            Some(m) => format!("{m:>7.0} ns/run ({n:>8} runs)"),
            None => format!("{:>28}", "not run"),
        };
        println!("{name:<24} {:>28} {:>28}", fmt(n0, m0), fmt(n1, m1));
        out.push(json!({ "program": name, "outside_slice": { "runs": n0, "mean_ns": m0 },
                         "inside_slice": { "runs": n1, "mean_ns": m1 } }));
    }
    json!(out)
}

fn stats(values: &mut [f64]) -> (f64, f64, f64) {
    values.sort_by(|a, b| a.total_cmp(b));
    (values[0], values[values.len() / 2], values[values.len() - 1])
}

fn storm(args: &Args) -> Value {
    println!("\n== Context-switch storm: pipe ping-pong round trips/s, {STORM_ROUNDS} alternating rounds of {STORM_MS} ms");
    let cg = TestCgroup::new("bench_storm");
    let worker = cg.mkdir("rbee.slice/bench/storm");
    let (mut none, mut watching, mut inside) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..STORM_ROUNDS {
        none.push(pingpong(&args.load, None, STORM_MS));
        let sampler = slice_sampler(&cg);
        watching.push(pingpong(&args.load, None, STORM_MS));
        inside.push(pingpong(&args.load, Some(&worker), STORM_MS));
        drop(sampler);
    }
    let (a, b, c) = (stats(&mut none), stats(&mut watching), stats(&mut inside));
    println!("{:<40} {:>10} {:>10} {:>10} {:>12}", "condition", "min", "median", "max", "vs without");
    let mut out = Vec::new();
    for (name, s) in [
        ("without the monitor", a),
        ("monitor attached, storm outside slice", b),
        ("storm inside the slice", c),
    ] {
        let ratio = s.1 / a.1;
        println!("{name:<40} {:>10.0} {:>10.0} {:>10.0} {:>11.1}%", s.0, s.1, s.2, (ratio - 1.0) * 100.0);
        out.push(
            json!({ "condition": name, "min": s.0, "median": s.1, "max": s.2, "median_vs_without": ratio }),
        );
    }
    json!(out)
}

/// On-CPU ns of all of a process's threads (`/proc/<pid>/task/*/schedstat`).
fn process_cpu_ns(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
                .filter_map(|s| s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()))
                .sum()
        })
        .unwrap_or(0)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn daemon_cost(args: &Args) -> Value {
    println!("\n== Daemon at 1 Hz: workers are cgroups with one sleeping process each");
    println!("   (RSS after 12 heartbeats; peak is VmHWM, reached while parsing the kernel's BTF at start)");
    println!(
        "{:>8} {:>11} {:>8} {:>9} {:>13} {:>15} {:>15}",
        "workers", "CPU % core", "RSS MiB", "peak MiB", "heartbeat KB", "latency p50 us", "latency p99 us"
    );
    let mut out = Vec::new();
    for n in DAEMON_WORKERS {
        let cg = TestCgroup::new(&format!("bench_daemon_{n}"));
        cg.mkdir("rbee.slice");
        let _sleepers: Vec<Workload> = (0..n)
            .map(|i| {
                let dir = cg.mkdir(&format!("rbee.slice/g{}/w{i}", i % 10));
                Workload::start(&args.load, &dir, &["sleep", "600"])
            })
            .collect();
        let root = cg.root.to_string_lossy().into_owned();
        let mut daemon = Command::new(&args.daemon)
            .args(["run", "--cgroup-root", &root, "--slice", &cg.rel("rbee.slice"), "--interval", "1s"])
            .args(["--count", &DAEMON_BEATS.to_string(), "--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "warn,latency=debug")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the daemon");
        let pid = daemon.id();
        let stderr = daemon.stderr.take().unwrap();
        let latencies = std::thread::spawn(move || {
            BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
                .filter_map(|l| {
                    l.split(" handed to the sink ").nth(1)?.split(' ').next()?.parse::<u64>().ok()
                })
                .collect::<Vec<u64>>()
        });
        let (mut first, mut last, mut size, mut peak, mut rss) = (None, None, 0, 0.0, 0.0);
        for (i, line) in BufReader::new(daemon.stdout.take().unwrap()).lines().enumerate() {
            let line = line.expect("daemon output");
            size = line.len();
            if i == 1 {
                first = Some((Instant::now(), process_cpu_ns(pid)));
            }
            if i == DAEMON_BEATS - 2 {
                last = Some((Instant::now(), process_cpu_ns(pid)));
                peak = proc_field(pid, "status", "VmHWM:") as f64 / 1024.0;
                rss = proc_field(pid, "status", "VmRSS:") as f64 / 1024.0;
            }
        }
        let status = daemon.wait().expect("daemon exit");
        assert!(status.success(), "the daemon failed with {n} workers: {status}");
        let (Some((t0, c0)), Some((t1, c1))) = (first, last) else { panic!("too few heartbeats") };
        let cpu_pct = (c1 - c0) as f64 / (t1 - t0).as_nanos() as f64 * 100.0;
        let mut lat = latencies.join().unwrap();
        lat.sort_unstable();
        let (p50, p99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
        println!(
            "{n:>8} {cpu_pct:>11.2} {rss:>8.1} {peak:>9.1} {:>13.1} {p50:>15} {p99:>15}",
            size as f64 / 1000.0
        );
        out.push(json!({ "workers": n, "cpu_pct_of_core": cpu_pct, "rss_mib": rss, "peak_rss_mib": peak,
                         "heartbeat_bytes": size, "latency_us": { "p50": p50, "p99": p99, "samples": lat.len() } }));
    }
    json!(out)
}

/// What `top` does: Σ utime+stime (clock ticks) of the processes in the cgroup now.
fn tick_cpu_ns(dir: &Path) -> u64 {
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    procs
        .lines()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|stat| {
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .sum::<u64>()
        * (1_000_000_000 / tck)
}

fn worker<'a>(sample: &'a monitor_user::sampler::Sample, instance: &str) -> &'a WorkerSample {
    sample.workers.iter().find(|w| w.cgroup.instance == instance).expect("worker in the sample")
}

fn cpu_accuracy(args: &Args) -> Value {
    println!("\n== CPU% accuracy over 3 s, against cpu.stat (worker frozen at both ends)");
    println!(
        "{:<22} {:>10} {:>10} {:>10} {:>12} {:>12}",
        "workload", "cpu.stat", "monitor", "top-style", "monitor err", "top err"
    );
    let cases: [(&str, &[&str]); 5] = [
        ("one busy thread", &["busy", "1", "60"]),
        ("two busy threads", &["busy", "2", "60"]),
        ("25 % duty cycle", &["duty", "25", "20", "60"]),
        ("bursty", &["burst", "60"]),
        ("short-lived children", &["forker", "60"]),
    ];
    let cg = TestCgroup::new("bench_cpu");
    let mut sampler = slice_sampler(&cg);
    let mut out = Vec::new();
    for (i, (name, load)) in cases.iter().enumerate() {
        let instance = format!("w{i}");
        let dir = cg.mkdir(&format!("rbee.slice/bench/{instance}"));
        let work = Workload::start(&args.load, &dir, load);
        std::thread::sleep(Duration::from_millis(500));
        let mut ends = Vec::new();
        for pause in [Duration::ZERO, Duration::from_secs(3)] {
            std::thread::sleep(pause);
            freeze(&dir);
            let s = sampler.sample().unwrap();
            let w = worker(&s, &instance);
            ends.push((w.at_ns, w.counters.cpu_ns, cpu_stat_ns(&dir), tick_cpu_ns(&dir)));
            thaw(&dir);
        }
        drop(work);
        let wall = (ends[1].0 - ends[0].0) as f64;
        let pct = |a: u64, b: u64| b.saturating_sub(a) as f64 / wall * 100.0;
        let (kernel, ours, top) =
            (pct(ends[0].2, ends[1].2), pct(ends[0].1, ends[1].1), pct(ends[0].3, ends[1].3));
        println!(
            "{name:<22} {kernel:>9.2}% {ours:>9.2}% {top:>9.2}% {:>+10.3}pp {:>+10.3}pp",
            ours - kernel,
            top - kernel
        );
        out.push(
            json!({ "workload": name, "cpu_stat_pct": kernel, "monitor_pct": ours, "top_style_pct": top,
                         "monitor_error_pp": ours - kernel, "top_style_error_pp": top - kernel }),
        );
    }
    json!(out)
}

fn io_accuracy(args: &Args) -> Value {
    println!("\n== I/O accuracy: bytes per worker against /proc/<pid>/io and the bytes moved (32 MiB)");
    println!(
        "{:<10} {:<16} {:>12} {:>12} {:>12} {:>10} {:>10}",
        "workload", "figure", "monitor", "/proc io", "moved", "vs proc", "vs moved"
    );
    let moved = 32 * MIB;
    // (workload, [(figure, /proc/<pid>/io key, bytes it moves)])
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str, u64)]);
    let cases: [Case; 4] = [
        ("rw", &[("syscall read", "rchar:", moved), ("syscall write", "wchar:", moved)]),
        ("coldread", &[("storage read", "read_bytes:", moved), ("storage write", "write_bytes:", moved)]),
        ("writesync", &[("storage write", "write_bytes:", moved)]),
        ("direct", &[("storage read", "read_bytes:", moved), ("storage write", "write_bytes:", moved)]),
    ];
    let cg = TestCgroup::new("bench_io");
    let mut sampler = slice_sampler(&cg);
    let mut out = Vec::new();
    for (mode, figures) in cases {
        let dir = cg.mkdir(&format!("rbee.slice/bench/{mode}"));
        let file = args.scratch.join(format!("io-{mode}"));
        let work = Workload::start(&args.load, &dir, &[mode, file.to_str().unwrap(), "32", "60"]);
        let deadline = Instant::now() + Duration::from_secs(60);
        while figures.iter().any(|(_, key, n)| proc_field(work.pid(), "io", key) < *n) {
            assert!(Instant::now() < deadline, "{mode}: the load did not finish");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(200));
        let s = sampler.sample().unwrap();
        let c = worker(&s, mode).counters;
        for (figure, key, n) in figures {
            let ours = match *key {
                "rchar:" => c.syscall_read_bytes,
                "wchar:" => c.syscall_write_bytes,
                "read_bytes:" => c.storage_read_bytes,
                _ => c.storage_write_bytes,
            };
            let kernel = proc_field(work.pid(), "io", key);
            let err = |base: u64| (ours as f64 - base as f64) / base as f64 * 100.0;
            println!(
                "{mode:<10} {figure:<16} {ours:>12} {kernel:>12} {n:>12} {:>+9.3}% {:>+9.3}%",
                err(kernel),
                err(*n)
            );
            out.push(json!({ "workload": mode, "figure": figure, "monitor_bytes": ours, "proc_io_bytes": kernel,
                             "moved_bytes": n, "error_vs_proc_pct": err(kernel), "error_vs_moved_pct": err(*n) }));
        }
        drop(work);
        let _ = std::fs::remove_file(&file);
    }
    json!(out)
}

/// Test cgroups of this process still present under its own v2 cgroup.
fn leftover_cgroups() -> usize {
    let prefix = format!("hm-test-{}-", std::process::id());
    std::fs::read_dir(own_v2_dir())
        .map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().starts_with(&prefix)).count())
        .unwrap_or(0)
}
