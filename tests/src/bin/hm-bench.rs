//! The benchmark `cargo xtask bench` runs: what the monitor costs and how accurate it is,
//! each measured side by side with its baseline, printed as tables and written as JSON.
//!
//!   hm-bench --daemon BIN --load BIN --out FILE --scratch DIR [--only SECTION]...
//!
//! Every cgroup it makes is below its own (`TestCgroup`) and removed before it exits, also when
//! it fails. Network load stays on 127.0.0.1. No figure fails it: it reports.
//!
//! The host-cost workloads use Debian's perf (`perf bench sched pipe`), hackbench (rt-tests),
//! nginx and wrk, which `scripts/bench-deps` installs; a workload whose tool is missing is
//! reported as skipped.
//!
//!   hm-bench threads N SECS    (internal) N threads asleep for SECS: the host's many tasks
use std::{
    collections::HashSet,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use hive_monitor_tests::{
    command_in, cpu_stat_ns, free_port, freeze, proc_field, thaw, TestCgroup, Workload,
};
use monitor_user::{probes::ProgramStats, sample::WorkerSample, sampler::Sampler, sources::cgroup::Slice};
use serde_json::{json, Value};

/// The daemon runs: how many workers, and whether each has a memory cgroup of its own.
const DAEMON_RUNS: [(usize, WorkerMemory); 4] = [
    (10, WorkerMemory::Shared),
    (100, WorkerMemory::Shared),
    (1000, WorkerMemory::Shared),
    (1000, WorkerMemory::Own),
];

/// Where the daemon reads a bench worker's memory from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum WorkerMemory {
    /// The workers share the bench's memory cgroup: their processes' counters, read by the
    /// task iterator.
    Shared,
    /// Each worker has a memory cgroup of its own, as `hive-monitor spawn` makes them: its
    /// files (v1 on a hybrid host, v2 on a unified one).
    Own,
}

impl WorkerMemory {
    fn name(self) -> &'static str {
        match self {
            WorkerMemory::Shared => "shared",
            WorkerMemory::Own => "own",
        }
    }
}
/// Heartbeats at 1 Hz per daemon run; the first two (start-up) are left out of the cost.
const DAEMON_BEATS: usize = 24;
const MIB: u64 = 1 << 20;
/// Rounds of each condition in the host-cost A/B, without and with the daemon alternating.
/// Seconds one round of `perf bench sched pipe` should take; its loop count is sized to it.
const PIPE_ROUND_S: f64 = 2.0;
const HACKBENCH_ARGS: [&str; 4] = ["-g", "4", "-l", "1000"];
const WRK_ARGS: [&str; 3] = ["-t2", "-c32", "-d3s"];
/// The worker the inside-the-slice workloads run in, below the slice.
const HOST_WORKER: &str = "llm/8080";
/// Sleeping tasks started for the kernel-time figure: processes × threads.
const SLEEPER_PROCS: usize = 100;
const SLEEPER_THREADS: usize = 100;
/// Heartbeats each kernel-time measurement reads after the first two.
const KERNEL_BEATS: usize = 8;

struct Args {
    daemon: String,
    load: String,
    out: PathBuf,
    scratch: PathBuf,
    /// Sections to run; all when empty.
    only: Vec<String>,
    /// Alternating rounds of each host-cost case.
    rounds: usize,
    /// A/A control of the host-cost section: neither half starts the daemon, so each ratio
    /// shows how far this machine's own scatter moves it.
    control: bool,
}

fn args() -> Args {
    let mut a = std::env::args().skip(1);
    let (mut daemon, mut load, mut out, mut scratch) = (None, None, None, None);
    let (mut only, mut rounds, mut control) = (Vec::new(), 9, false);
    while let Some(flag) = a.next() {
        if flag == "--control" {
            control = true;
            continue;
        }
        if flag == "threads" {
            let n = a.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| usage());
            let secs = a.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| usage());
            sleep_threads(n, secs);
        }
        let value = a.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--daemon" => daemon = Some(value),
            "--load" => load = Some(value),
            "--out" => out = Some(PathBuf::from(value)),
            "--scratch" => scratch = Some(PathBuf::from(value)),
            "--only" => only.push(value),
            "--rounds" => rounds = value.parse().ok().filter(|r| *r >= 2).unwrap_or_else(|| usage()),
            _ => usage(),
        }
    }
    match (daemon, load, out, scratch) {
        (Some(daemon), Some(load), Some(out), Some(scratch)) => {
            Args { daemon, load, out, scratch, only, rounds, control }
        }
        _ => usage(),
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: hm-bench --daemon BIN --load BIN --out FILE --scratch DIR [--rounds N] [--control] [--only SECTION]..."
    );
    std::process::exit(2)
}

/// `hm-bench threads N SECS`: N threads (this one included) asleep for SECS, then exit; also
/// when the bench that started it dies.
fn sleep_threads(n: usize, secs: u64) -> ! {
    // SAFETY: plain prctl; the parent is the bench.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    for _ in 1..n {
        std::thread::Builder::new()
            .stack_size(64 << 10)
            .spawn(move || std::thread::sleep(Duration::from_secs(secs)))
            .expect("start a sleeping thread");
    }
    std::thread::sleep(Duration::from_secs(secs));
    std::process::exit(0)
}

/// A section of the report: what it measures, as JSON.
type Section = fn(&Args) -> Value;

fn main() {
    let mut args = args();
    std::fs::create_dir_all(&args.scratch).expect("scratch directory");
    // nginx takes its prefix and configuration as absolute paths.
    args.scratch = std::fs::canonicalize(&args.scratch).expect("scratch directory");
    let started = Instant::now();
    let mut report = json!({});
    let sections: [(&str, Section); 7] = [
        ("ebpf_cost", ebpf_cost),
        ("host_cost", host_cost),
        ("kernel_time", kernel_time),
        ("daemon", daemon_cost),
        ("cpu_accuracy", cpu_accuracy),
        ("io_accuracy", io_accuracy),
        ("record", record_size),
    ];
    for name in &args.only {
        if !sections.iter().any(|(n, _)| n == name) {
            usage();
        }
    }
    for (name, run) in sections {
        if args.only.is_empty() || args.only.iter().any(|o| o == name) {
            report[name] = run(&args);
            println!("   [{} s so far]", started.elapsed().as_secs());
        }
    }
    report["seconds"] = json!(started.elapsed().as_secs());
    let left = leftover_cgroups();
    println!("\ncgroups left behind: {left}; took {} s", started.elapsed().as_secs());
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

/// This process's own v2 cgroup directory: a load run "outside the slice" stays in it.
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
    println!(
        "   (memory: shared = the workers share a memory cgroup, and their processes' counters are read;"
    );
    println!("    own = each worker has a memory cgroup of its own, as `spawn` makes, whose files are read)");
    println!(
        "   (CPU over heartbeats 2..{}; RSS after them; peak is VmHWM, reached while parsing the kernel's BTF at start;",
        DAEMON_BEATS - 2
    );
    println!("    kernel ms/sample from collector.self.kernel_s where the heartbeat has it, else the BPF");
    println!("    programs' run_time_ns over the same heartbeats, with kernel.bpf_stats_enabled=1)");
    println!(
        "{:>8} {:>7} {:>11} {:>8} {:>9} {:>13} {:>15} {:>15} {:>17}",
        "workers",
        "memory",
        "CPU % core",
        "RSS MiB",
        "peak MiB",
        "heartbeat KB",
        "latency p50 us",
        "latency p99 us",
        "kernel ms/sample"
    );
    let _stats = BpfStats::enable();
    let mut out = Vec::new();
    let mut sources = HashSet::new();
    for (n, memory) in DAEMON_RUNS {
        let Some((cg, _sleepers)) = sleeping_workers(args, n, memory) else {
            println!(
                "{n:>8} {:>7}  (skipped: no memory controller to give each worker its own)",
                memory.name()
            );
            continue;
        };
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
        let mut beats = Vec::new();
        for (i, line) in BufReader::new(daemon.stdout.take().unwrap()).lines().enumerate() {
            let line = line.expect("daemon output");
            size = line.len();
            if (1..=DAEMON_BEATS - 2).contains(&i) {
                beats.push(Beat {
                    at: Instant::now(),
                    cpu_ns: process_cpu_ns(pid),
                    bpf: bpf_run(pid),
                    self_cost: serde_json::from_str::<Value>(&line).ok().as_ref().and_then(self_cost),
                });
            }
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
        // The first of `beats` only opens the interval the others close.
        let (kernel_ms, source, _) = kernel_ms_per_sample(if beats.iter().all(|b| b.self_cost.is_some()) {
            &beats[1..]
        } else {
            &beats
        });
        sources.insert(source);
        let own = self_summary(&beats[1..]);
        println!(
            "{n:>8} {:>7} {cpu_pct:>11.2} {rss:>8.1} {peak:>9.1} {:>13.1} {p50:>15} {p99:>15} {:>17}",
            memory.name(),
            size as f64 / 1000.0,
            kernel_ms.map_or("n/a".into(), |m| format!("{m:.3}"))
        );
        out.push(json!({ "workers": n, "worker_memory": memory.name(), "cpu_pct_of_core": cpu_pct, "rss_mib": rss, "peak_rss_mib": peak,
                         "heartbeat_bytes": size, "latency_us": { "p50": p50, "p99": p99, "samples": lat.len() },
                         "kernel_ms_per_sample": kernel_ms, "kernel_source": source, "collector_self": own }));
    }
    let sources: Vec<_> = sources.into_iter().collect();
    println!("   kernel figure from: {}", sources.join(", "));
    json!(out)
}

/// `n` workers, `rbee.slice/g<i % 10>/w<i>`, each with one sleeping process; with
/// `WorkerMemory::Own` each also in a memory cgroup of its own: the v1 one of the same path
/// on a hybrid host, else the v2 one, the memory controller enabled down to it. `None` when
/// neither hierarchy offers the memory controller.
fn sleeping_workers(args: &Args, n: usize, memory: WorkerMemory) -> Option<(TestCgroup, Vec<Workload>)> {
    let name = format!("bench_daemon_{n}_{}", memory.name());
    let cg = match memory {
        WorkerMemory::Shared => TestCgroup::new(&name),
        WorkerMemory::Own => match TestCgroup::with_v1(&name, &["memory"]) {
            Some(cg) => cg,
            None => {
                let cg = TestCgroup::new(&name);
                let controllers = std::fs::read_to_string(cg.dir.join("cgroup.controllers")).ok()?;
                controllers.split_whitespace().any(|c| c == "memory").then_some(cg)?
            }
        },
    };
    let v1 = Path::new("/sys/fs/cgroup/memory").join(&cg.rel);
    let hybrid = memory == WorkerMemory::Own && v1.is_dir();
    let enable_memory = |dir: &Path| {
        if memory == WorkerMemory::Own && !hybrid {
            std::fs::write(dir.join("cgroup.subtree_control"), "+memory")
                .unwrap_or_else(|e| panic!("enable memory below {}: {e}", dir.display()));
        }
    };
    enable_memory(&cg.dir);
    enable_memory(&cg.mkdir("rbee.slice"));
    let sleepers = (0..n)
        .map(|i| {
            let group = format!("rbee.slice/g{}", i % 10);
            if i < 10 {
                enable_memory(&cg.mkdir(&group));
            }
            let rel = format!("{group}/w{i}");
            let dir = cg.mkdir(&rel);
            if !hybrid {
                return Workload::start(&args.load, &dir, &["sleep", "600"]);
            }
            let own = v1.join(&rel);
            std::fs::create_dir_all(&own).unwrap_or_else(|e| panic!("mkdir {}: {e}", own.display()));
            Workload::start_in(&args.load, &[&dir, &own], &["sleep", "600"])
        })
        .collect();
    Some((cg, sleepers))
}

/// Heartbeats recorded per run of the `record` section.
const RECORD_BEATS: usize = 120;
/// The budget: bytes on disk per worker per heartbeat at 1 Hz.
const RECORD_BUDGET: f64 = 200.0;

/// `run --record` at 1 Hz: the record's size on disk (database and log, after the daemon
/// exits) per worker per heartbeat, beside the JSON it holds.
fn record_size(args: &Args) -> Value {
    println!("\n== Record at 1 Hz, {RECORD_BEATS} heartbeats: bytes on disk per worker per heartbeat (budget {RECORD_BUDGET})");
    println!("   (10 workers with a 5 % duty cycle, the rest asleep)");
    println!(
        "{:>8} {:>12} {:>12} {:>14} {:>8}",
        "workers", "JSON bytes", "disk bytes", "per worker/hb", "budget"
    );
    let mut out = Vec::new();
    for n in [10, 100] {
        let cg = TestCgroup::new(&format!("bench_record_{n}"));
        let _loads: Vec<Workload> = (0..n)
            .map(|i| {
                let dir = cg.mkdir(&format!("rbee.slice/g{}/w{i}", i % 10));
                let load: &[&str] = if i < 10 { &["duty", "5", "100", "600"] } else { &["sleep", "600"] };
                Workload::start(&args.load, &dir, load)
            })
            .collect();
        let dir = args.scratch.join(format!("record-{n}"));
        let _ = std::fs::remove_dir_all(&dir);
        let root = cg.root.to_string_lossy().into_owned();
        let output = Command::new(&args.daemon)
            .args(["run", "--cgroup-root", &root, "--slice", &cg.rel("rbee.slice"), "--interval", "1s"])
            .args(["--count", &RECORD_BEATS.to_string(), "--listen", "127.0.0.1:0", "--record"])
            .arg(&dir)
            .stderr(Stdio::null())
            .output()
            .expect("run the daemon");
        assert!(output.status.success(), "the daemon failed with {n} workers");
        let json_bytes = output.stdout.len();
        let disk = monitor_user::record::disk_bytes(&dir.join(monitor_user::record::FILE));
        let per = disk as f64 / (n * RECORD_BEATS) as f64;
        let verdict = if per <= RECORD_BUDGET { "ok" } else { "OVER" };
        println!("{n:>8} {json_bytes:>12} {disk:>12} {per:>14.1} {verdict:>8}");
        out.push(
            json!({ "workers": n, "heartbeats": RECORD_BEATS, "json_bytes": json_bytes, "disk_bytes": disk,
                         "bytes_per_worker_per_heartbeat": per, "budget": RECORD_BUDGET }),
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
    json!(out)
}

/// What `top` does: Σ utime+stime (clock ticks) of the processes in the cgroup now.
fn tick_cpu_ns(dir: &Path) -> u64 {
    // SAFETY: sysconf only reads a system setting.
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

fn worker<'a>(sample: &'a monitor_user::sample::Sample, instance: &str) -> &'a WorkerSample {
    sample.workers.iter().find(|w| &*w.cgroup.instance == instance).expect("worker in the sample")
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
            ends.push((w.at_ns, w.totals.cpu_ns.unwrap(), cpu_stat_ns(&dir), tick_cpu_ns(&dir)));
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
        let c = worker(&s, mode).totals.map(|v| v.expect("the probes measure I/O"));
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

// ---------------------------------------------------------------------------------------------
// The daemon as a child: started attached to a test slice, its heartbeats read as they come.

/// The daemon's BPF programs' run time and count, summed over the programs it holds open
/// (`/proc/<pid>/fdinfo/*`, one per program id); counted only while `bpf_stats_enabled` is 1.
#[derive(Clone, Copy, Default, Debug)]
struct BpfRun {
    run_ns: u64,
    runs: u64,
    programs: usize,
}

fn bpf_run(pid: u32) -> Option<BpfRun> {
    let mut seen = HashSet::new();
    let mut total = BpfRun::default();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).ok()?.flatten() {
        let Ok(text) = std::fs::read_to_string(fd.path()) else { continue };
        let field = |key: &str| {
            text.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim().parse::<u64>().ok())
        };
        let (Some(id), Some(ns), Some(runs)) = (field("prog_id:"), field("run_time_ns:"), field("run_cnt:"))
        else {
            continue;
        };
        if seen.insert(id) {
            total.run_ns += ns;
            total.runs += runs;
            total.programs += 1;
        }
    }
    (total.programs > 0).then_some(total)
}

/// `collector.self` of a heartbeat, where the daemon reports its own cost.
#[derive(Clone, Copy, Debug)]
struct SelfCost {
    cpu_s: Option<f64>,
    rss_bytes: Option<f64>,
    kernel_s: Option<f64>,
}

fn self_cost(beat: &Value) -> Option<SelfCost> {
    let s = beat.get("collector")?.get("self")?;
    s.is_object().then(|| SelfCost {
        cpu_s: s.get("cpu_s").and_then(Value::as_f64),
        rss_bytes: s.get("rss_bytes").and_then(Value::as_f64),
        kernel_s: s.get("kernel_s").and_then(Value::as_f64),
    })
}

/// Medians of the `collector.self` figures over `beats`, or null where the daemon sends none.
fn self_summary(beats: &[Beat]) -> Value {
    let own: Vec<SelfCost> = beats.iter().filter_map(|b| b.self_cost).collect();
    if own.is_empty() {
        return Value::Null;
    }
    let pick = |f: fn(&SelfCost) -> Option<f64>| {
        let v: Vec<f64> = own.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| median(&v))
    };
    json!({ "cpu_s_median": pick(|s| s.cpu_s), "rss_bytes_median": pick(|s| s.rss_bytes),
            "kernel_s_median": pick(|s| s.kernel_s), "heartbeats": own.len() })
}

/// One heartbeat as the reader saw it arrive.
struct Beat {
    at: Instant,
    /// The daemon's on-CPU ns, all threads, when the line arrived.
    cpu_ns: u64,
    bpf: Option<BpfRun>,
    self_cost: Option<SelfCost>,
}

/// `hive-monitor run` attached to `<test cgroup>/rbee.slice` at 1 Hz; stopped with SIGTERM (then
/// killed) when dropped. Its log goes to `<scratch>/daemon-<name>.log`.
struct Daemon {
    child: Child,
    beats: mpsc::Receiver<Beat>,
    log: PathBuf,
}

impl Daemon {
    fn start(args: &Args, cg: &TestCgroup, name: &str) -> Self {
        let log = args.scratch.join(format!("daemon-{name}.log"));
        let root = cg.root.to_string_lossy().into_owned();
        let mut child = Command::new(&args.daemon)
            .args(["run", "--cgroup-root", &root, "--slice", &cg.rel("rbee.slice"), "--interval", "1s"])
            .args(["--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("daemon log"))
            .spawn()
            .expect("start the daemon");
        let pid = child.id();
        let stdout = child.stdout.take().unwrap();
        let (tx, beats) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let at = Instant::now();
                let (cpu_ns, bpf) = (process_cpu_ns(pid), bpf_run(pid));
                let self_cost = serde_json::from_str::<Value>(&line).ok().as_ref().and_then(self_cost);
                if tx.send(Beat { at, cpu_ns, bpf, self_cost }).is_err() {
                    break;
                }
            }
        });
        Self { child, beats, log }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next heartbeat; panics (the test cgroups are removed as it unwinds) if none comes.
    fn next(&self) -> Beat {
        self.beats.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            panic!("no heartbeat from the daemon within 30 s; its log:\n{log}")
        })
    }

    /// Waits for the first heartbeat: the probes are attached.
    fn ready(self) -> Self {
        self.next();
        self
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        stop_child(&mut self.child, libc::SIGTERM, Duration::from_secs(5));
    }
}

/// Sends `signal`, waits up to `grace` for the exit, then kills; always reaps.
fn stop_child(child: &mut Child, signal: i32, grace: Duration) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    // SAFETY: a child of ours, not yet reaped, so the pid is still its own.
    unsafe { libc::kill(child.id() as i32, signal) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Half the interquartile range of `values`, relative to their median: how far apart runs
/// of the same case land on this machine, which a ratio must clear to say anything.
fn noise(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.len() < 4 {
        return f64::NAN;
    }
    let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    (q(0.75) - q(0.25)) / 2.0 / median(values)
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Kernel-side milliseconds per sample over heartbeats `beats` (each one sample): the daemon's
/// own `collector.self.kernel_s` where every heartbeat has it, else the BPF programs' run time
/// between consecutive heartbeats. Returns (median ms, where it came from, per-sample values).
fn kernel_ms_per_sample(beats: &[Beat]) -> (Option<f64>, &'static str, Vec<f64>) {
    let own: Vec<f64> =
        beats.iter().filter_map(|b| b.self_cost.and_then(|s| s.kernel_s)).map(|s| s * 1e3).collect();
    if !beats.is_empty() && own.len() == beats.len() {
        return (Some(median(&own)), "collector.self.kernel_s", own);
    }
    let per: Vec<f64> = beats
        .windows(2)
        .filter_map(|w| Some((w[1].bpf?.run_ns.saturating_sub(w[0].bpf?.run_ns)) as f64 / 1e6))
        .collect();
    if per.is_empty() {
        return (None, "unavailable", per);
    }
    (Some(median(&per)), "bpf_stats run_time_ns (fdinfo)", per)
}

// ---------------------------------------------------------------------------------------------
// The monitor's cost to the host: real workloads without and with the daemon, alternating.

#[derive(Clone, Copy, PartialEq)]
enum Place {
    /// A test cgroup that is not under the slice.
    Outside,
    /// The worker `<slice>/llm/8080`.
    Inside,
}

impl Place {
    fn name(self) -> &'static str {
        match self {
            Place::Outside => "outside the slice",
            Place::Inside => "inside a worker",
        }
    }
    /// Lowest ratio with/without the monitor aimed for.
    fn target(self) -> f64 {
        match self {
            Place::Outside => 0.99,
            Place::Inside => 0.98,
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Load {
    /// `perf bench sched pipe -l N`, both ends pinned to one CPU.
    PerfPipe(u64),
    /// `hm-load pingpong MS`, when perf cannot run.
    PingPong(u64),
    Hackbench,
    Http,
}

impl Load {
    fn name(self) -> String {
        match self {
            Load::PerfPipe(n) => format!("perf bench sched pipe -l {n}"),
            Load::PingPong(ms) => format!("hm-load pingpong {ms} (perf fallback)"),
            Load::Hackbench => format!("hackbench {}", HACKBENCH_ARGS.join(" ")),
            Load::Http => format!("nginx + wrk {}", WRK_ARGS.join(" ")),
        }
    }
    fn unit(self) -> &'static str {
        match self {
            Load::PerfPipe(_) => "ops/s",
            Load::PingPong(_) => "round trips/s",
            Load::Hackbench => "runs/s",
            Load::Http => "requests/s",
        }
    }
    /// CPUs the load runs on: the ping-pong is pinned to one.
    fn cpus(self) -> usize {
        match self {
            Load::PerfPipe(_) | Load::PingPong(_) => 1,
            Load::Hackbench | Load::Http => usable_cpus(),
        }
    }
    fn short(self) -> &'static str {
        match self {
            Load::PerfPipe(_) | Load::PingPong(_) => "pipe ping-pong",
            Load::Hackbench => "hackbench",
            Load::Http => "nginx/wrk",
        }
    }
}

fn tool(name: &str) -> Option<PathBuf> {
    ["/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin", "/usr/local/sbin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
}

/// The first CPU this process may run on: where the pipe ping-pong is pinned.
fn first_cpu() -> usize {
    // SAFETY: a zeroed cpu_set_t is valid; sched_getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
            if let Some(cpu) = (0..libc::CPU_SETSIZE as usize).find(|&c| libc::CPU_ISSET(c, &set)) {
                return cpu;
            }
        }
    }
    0
}

/// `perf bench sched pipe -l loops` in `cgroup`, pinned to `cpu`: (ops/s, seconds), or why not.
fn perf_pipe(perf: &Path, cgroup: &Path, loops: u64, cpu: usize) -> Result<(f64, f64), String> {
    let mut cmd =
        command_in(perf.to_str().unwrap(), &[cgroup], &["bench", "sched", "pipe", "-l", &loops.to_string()]);
    hive_monitor_tests::pin_to_cpu(&mut cmd, cpu);
    let out = cmd.output().map_err(|e| format!("cannot run perf: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!("perf exited {}: {}{}", out.status, text, String::from_utf8_lossy(&out.stderr)));
    }
    let number = |suffix: &str| {
        text.lines().find_map(|l| {
            let l = l.trim();
            l.strip_suffix(suffix)
                .and_then(|v| v.trim().trim_start_matches("Total time:").trim().parse::<f64>().ok())
        })
    };
    match (number("ops/sec"), number("[sec]")) {
        (Some(ops), Some(secs)) if ops > 0.0 => Ok((ops, secs)),
        _ => Err(format!("no ops/sec in perf's output: {text}")),
    }
}

/// `hackbench -g 4 -l 1000` in `cgroup`: runs per second (1 / its time).
fn hackbench(exe: &Path, cgroup: &Path) -> Result<f64, String> {
    let out = command_in(exe.to_str().unwrap(), &[cgroup], &HACKBENCH_ARGS)
        .output()
        .map_err(|e| format!("cannot run hackbench: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!("hackbench exited {}: {}", out.status, String::from_utf8_lossy(&out.stderr)));
    }
    let secs = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Time:")?.trim().parse::<f64>().ok())
        .ok_or_else(|| format!("no Time: in hackbench's output: {text}"))?;
    Ok(1.0 / secs)
}

/// Debian's nginx in the foreground, with a private prefix and configuration under the
/// scratch directory, serving a small static file on 127.0.0.1:port; stopped (SIGTERM to the
/// master, which ends its workers) when dropped.
struct Nginx {
    child: Child,
    port: u16,
}

impl Nginx {
    fn start(exe: &Path, scratch: &Path, cgroup: &Path) -> Result<Self, String> {
        let prefix = scratch.join("nginx");
        for dir in ["www", "logs", "tmp"] {
            std::fs::create_dir_all(prefix.join(dir)).map_err(|e| format!("nginx prefix: {e}"))?;
        }
        let page: String = (0..612).map(|i| (b'a' + (i % 26) as u8) as char).collect();
        std::fs::write(prefix.join("www/index.html"), page).map_err(|e| format!("nginx page: {e}"))?;
        let port = free_port();
        let p = prefix.display();
        let conf = format!(
            "daemon off;\nmaster_process on;\nworker_processes 1;\npid {p}/nginx.pid;\n\
             error_log {p}/logs/error.log warn;\nevents {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {p}/tmp/body;\n  proxy_temp_path {p}/tmp/proxy;\n  \
             fastcgi_temp_path {p}/tmp/fastcgi;\n  uwsgi_temp_path {p}/tmp/uwsgi;\n  scgi_temp_path {p}/tmp/scgi;\n  \
             server {{ listen 127.0.0.1:{port}; root {p}/www; }}\n}}\n"
        );
        let conf_path = prefix.join("nginx.conf");
        std::fs::write(&conf_path, conf).map_err(|e| format!("nginx.conf: {e}"))?;
        let args = [
            "-p",
            prefix.to_str().unwrap(),
            "-c",
            conf_path.to_str().unwrap(),
            "-e",
            &format!("{p}/logs/error.log"),
        ];
        let child = command_in(exe.to_str().unwrap(), &[cgroup], &args)
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start nginx: {e}"))?;
        let mut nginx = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(nginx);
            }
            if let Ok(Some(status)) = nginx.child.try_wait() {
                let log = std::fs::read_to_string(prefix.join("logs/error.log")).unwrap_or_default();
                return Err(format!("nginx exited {status}: {log}"));
            }
            if Instant::now() > deadline {
                return Err("nginx did not listen within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        stop_child(&mut self.child, libc::SIGTERM, Duration::from_secs(5));
    }
}

/// wrk against a fresh nginx in `cgroup`, wrk itself in the bench's own cgroup (outside the
/// slice): requests per second.
fn http(nginx: &Path, wrk: &Path, scratch: &Path, cgroup: &Path) -> Result<f64, String> {
    let server = Nginx::start(nginx, scratch, cgroup)?;
    let url = format!("http://127.0.0.1:{}/index.html", server.port);
    let out =
        Command::new(wrk).args(WRK_ARGS).arg(&url).output().map_err(|e| format!("cannot run wrk: {e}"))?;
    drop(server);
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!("wrk exited {}: {}", out.status, String::from_utf8_lossy(&out.stderr)));
    }
    if let Some(errors) = text.lines().find(|l| l.contains("Non-2xx")) {
        return Err(format!("nginx answered errors: {}", errors.trim()));
    }
    if let Some(errors) = text.lines().find(|l| l.contains("Socket errors")) {
        eprintln!("   wrk: {} (the round is kept)", errors.trim());
    }
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:")?.trim().parse::<f64>().ok())
        .ok_or_else(|| format!("no Requests/sec in wrk's output: {text}"))
}

struct Tools {
    perf: Option<PathBuf>,
    hackbench: Option<PathBuf>,
    nginx: Option<PathBuf>,
    wrk: Option<PathBuf>,
}

fn run_load(args: &Args, tools: &Tools, load: Load, cgroup: &Path, cpu: usize) -> Result<f64, String> {
    match load {
        Load::PerfPipe(loops) => perf_pipe(tools.perf.as_deref().unwrap(), cgroup, loops, cpu).map(|r| r.0),
        Load::PingPong(ms) => Ok(pingpong(&args.load, Some(cgroup), ms)),
        Load::Hackbench => hackbench(tools.hackbench.as_deref().unwrap(), cgroup),
        Load::Http => {
            http(tools.nginx.as_deref().unwrap(), tools.wrk.as_deref().unwrap(), &args.scratch, cgroup)
        }
    }
}

/// One workload at one place: its throughput in every round, without and with the daemon.
struct HostCase {
    load: Load,
    place: Place,
    without: Vec<f64>,
    with: Vec<f64>,
    /// Per monitored run: the CPU the daemon and its programs used during it, as a share
    /// of the CPUs the load ran on.
    monitor_share: Vec<f64>,
    errors: Vec<String>,
}

/// CPUs this process may run on: the loads other than the pinned ping-pong use them all.
fn usable_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// The daemon's CPU time (all threads) plus its programs' run time, ns.
fn monitor_cpu_ns(pid: u32) -> u64 {
    process_cpu_ns(pid) + bpf_run(pid).map_or(0, |b| b.run_ns)
}

/// 95 % interval of the ratio of medians (with / without), by resampling each side's
/// rounds: how far the ratio could be from what a quieter machine would measure.
fn ratio_interval(without: &[f64], with: &[f64]) -> Option<(f64, f64)> {
    if without.len() < 4 || with.len() < 4 {
        return None;
    }
    // Seeded: the same rounds give the same interval.
    let mut rng = fastrand::Rng::with_seed(0x6869_7665);
    let mut resample = |v: &[f64]| median(&(0..v.len()).map(|_| v[rng.usize(..v.len())]).collect::<Vec<_>>());
    let mut ratios: Vec<f64> = (0..RESAMPLES).map(|_| resample(with) / resample(without)).collect();
    ratios.sort_by(|a, b| a.total_cmp(b));
    let at = |p: f64| ratios[((RESAMPLES - 1) as f64 * p).round() as usize];
    Some((at(0.025), at(0.975)))
}

const RESAMPLES: usize = 2000;

fn host_cost(args: &Args) -> Value {
    println!(
        "\n== Cost to the host: throughput without and with `hive-monitor run` attached to the slice,\n   \
         {} rounds each, alternating; ratio = median with / median without",
        args.rounds
    );
    if args.control {
        println!(
            "   CONTROL (--control): neither half starts the daemon; each ratio is this machine's own scatter"
        );
    }
    let tools =
        Tools { perf: tool("perf"), hackbench: tool("hackbench"), nginx: tool("nginx"), wrk: tool("wrk") };
    let cg = TestCgroup::new("bench_host");
    cg.mkdir("rbee.slice");
    let inside = cg.mkdir(&format!("rbee.slice/{HOST_WORKER}"));
    let outside = cg.mkdir("outside");
    let cpu = first_cpu();
    let mut notes = Vec::new();

    // The pipe ping-pong: perf's, with the loop count sized for PIPE_ROUND_S (the calibration
    // run is also the warm-up), or hm-load's when perf cannot run here.
    let pipe = match &tools.perf {
        Some(perf) => match perf_pipe(perf, &outside, 200_000, cpu) {
            Ok((ops, _)) => {
                let loops =
                    ((ops * PIPE_ROUND_S / 10_000.0).round() as u64 * 10_000).clamp(50_000, 10_000_000);
                Load::PerfPipe(loops)
            }
            Err(e) => {
                notes.push(format!("perf bench sched pipe refused ({e}); the pipe ping-pong is hm-load's"));
                Load::PingPong((PIPE_ROUND_S * 1000.0) as u64)
            }
        },
        None => {
            notes.push("perf is not installed (scripts/bench-deps); the pipe ping-pong is hm-load's".into());
            Load::PingPong((PIPE_ROUND_S * 1000.0) as u64)
        }
    };
    let mut loads = vec![pipe];
    if tools.hackbench.is_some() {
        loads.push(Load::Hackbench);
    } else {
        notes.push("hackbench is not installed (rt-tests, scripts/bench-deps): skipped".into());
    }
    if tools.nginx.is_some() && tools.wrk.is_some() {
        loads.push(Load::Http);
    } else {
        notes.push("nginx or wrk is not installed (scripts/bench-deps): the HTTP load is skipped".into());
    }
    for note in &notes {
        println!("   note: {note}");
    }
    println!(
        "   pipe ping-pong: both ends pinned to CPU {cpu}; wrk runs outside the slice; nginx where shown"
    );

    let mut cases: Vec<HostCase> = loads
        .iter()
        .flat_map(|&load| {
            [Place::Outside, Place::Inside].map(|place| HostCase {
                load,
                place,
                without: Vec::new(),
                with: Vec::new(),
                monitor_share: Vec::new(),
                errors: Vec::new(),
            })
        })
        .collect();
    // Counts the programs' run time, for the monitor's share of each monitored run.
    let _stats = BpfStats::enable();
    let started = Instant::now();
    for round in 0..args.rounds {
        // ABBA: odd rounds start with the daemon, so a drift of the host weighs on both alike.
        let order = if round % 2 == 0 { [false, true] } else { [true, false] };
        for monitored in order {
            let daemon = (monitored && !args.control).then(|| Daemon::start(args, &cg, "host").ready());
            // Each ABBA pair of rounds starts with the next case, so none is always first.
            let n = cases.len();
            for i in 0..n {
                let case = &mut cases[(i + round / 2) % n];
                let dir = if case.place == Place::Inside { &inside } else { &outside };
                let before = daemon.as_ref().map(|d| (Instant::now(), monitor_cpu_ns(d.pid())));
                let result = run_load(args, &tools, case.load, dir, cpu);
                if let (Some(d), Some((t0, c0)), Ok(_)) = (&daemon, before, &result) {
                    let used = monitor_cpu_ns(d.pid()).saturating_sub(c0) as f64;
                    case.monitor_share
                        .push(used / (t0.elapsed().as_nanos() as f64 * case.load.cpus() as f64));
                }
                match result {
                    Ok(v) if monitored => case.with.push(v),
                    Ok(v) => case.without.push(v),
                    Err(e) => {
                        eprintln!("   {} {}: {e}", case.load.short(), case.place.name());
                        case.errors.push(e);
                    }
                }
            }
            drop(daemon);
        }
        println!("   round {}/{} done ({} s)", round + 1, args.rounds, started.elapsed().as_secs());
    }

    let rows = host_table(&cases, pipe);
    json!({ "rounds": args.rounds, "control": args.control, "pipe_cpu": cpu, "notes": notes, "rows": rows })
}

/// Prints the host-cost table; returns its rows as JSON.
fn host_table(cases: &[HostCase], pipe: Load) -> Vec<Value> {
    println!(
        "\n| {:<38} | {:<17} | {:>16} | {:>16} | {:>6} | {:>13} | {:>6} | {:<12} | {:>7} | {:>8} |",
        "workload",
        "where",
        "without (median)",
        "with (median)",
        "ratio",
        "95% interval",
        "target",
        "meets",
        "noise",
        "monitor"
    );
    println!(
        "|{:-<40}|{:-<19}|{:->18}|{:->18}|{:->8}|{:->15}|{:->8}|{:-<14}|{:->9}|{:->10}|",
        "", "", "", "", "", "", "", "", "", ""
    );
    let mut rows = Vec::new();
    for case in cases {
        let (a, b) = (median(&case.without), median(&case.with));
        let ratio = (!case.without.is_empty() && !case.with.is_empty()).then(|| b / a);
        let target = case.place.target();
        let meets = ratio.map(|r| r >= target);
        let interval = ratio_interval(&case.without, &case.with);
        // Only an interval wholly on one side of the target says which side the cost is on.
        let verdict = match (meets, interval) {
            (None, _) => "n/a",
            (Some(_), Some((lo, _))) if lo >= target => "yes",
            (Some(_), Some((_, hi))) if hi < target => "no",
            (Some(_), Some(_)) => "within noise",
            (Some(true), None) => "yes",
            (Some(false), None) => "no",
        };
        let share = (!case.monitor_share.is_empty()).then(|| median(&case.monitor_share));
        let cell = |v: f64, n: usize| match n {
            0 => "failed".to_string(),
            _ if v >= 1000.0 => format!("{v:.0}"),
            _ if v >= 10.0 => format!("{v:.2}"),
            _ => format!("{v:.4}"),
        };
        let spread = noise(&case.without);
        println!(
            "| {:<38} | {:<17} | {:>16} | {:>16} | {:>6} | {:>13} | {:>6} | {:<12} | {:>7} | {:>8} |",
            case.load.name(),
            case.place.name(),
            cell(a, case.without.len()),
            cell(b, case.with.len()),
            ratio.map_or("n/a".into(), |r| format!("{r:.3}")),
            interval.map_or("n/a".into(), |(lo, hi)| format!("{lo:.3}–{hi:.3}")),
            format!("≥{target}"),
            verdict,
            if spread.is_nan() { "n/a".to_string() } else { format!("±{:.1}%", spread * 100.0) },
            share.map_or("n/a".into(), |s| format!("{:.3}%", s * 100.0))
        );
        rows.push(json!({
            "workload": case.load.short(), "command": case.load.name(), "unit": case.load.unit(),
            "where": case.place.name(), "without": case.without, "with": case.with,
            "without_median": (!case.without.is_empty()).then_some(a),
            "with_median": (!case.with.is_empty()).then_some(b),
            "ratio": ratio, "target": target, "meets_target": meets, "errors": case.errors,
            "ratio_interval_95": interval.map(|(lo, hi)| [lo, hi]), "verdict": verdict,
            "monitor_share": case.monitor_share, "monitor_share_median": share,
            "noise_half_iqr": (!spread.is_nan()).then_some(spread),
        }));
    }
    println!("   units: pipe ping-pong {}, hackbench runs/s (1 / its time), nginx requests/s", pipe.unit());
    println!(
        "   noise: half the interquartile range of the runs without the monitor, relative to their median"
    );
    println!(
        "   95% interval: of the ratio, resampling each side's rounds ({RESAMPLES}×); meets: yes or no only when the\n   \
         whole interval is on one side of the target, else within noise"
    );
    println!(
        "   monitor: median CPU the daemon and its programs (bpf_stats run time) used during a monitored run, as a\n   \
         share of the CPUs the load ran on (the pinned ping-pong's one, all {} for the others)",
        usable_cpus()
    );
    rows
}

// ---------------------------------------------------------------------------------------------
// Kernel-side time per sample with many tasks on the host.

/// Tasks on the host now (`/proc/loadavg`: running/total).
fn host_tasks() -> u64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().nth(3)?.split('/').nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn cgroup_threads(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("cgroup.threads")).map(|t| t.lines().count()).unwrap_or(0)
}

fn kernel_time(args: &Args) -> Value {
    let extra = SLEEPER_PROCS * SLEEPER_THREADS;
    println!(
        "\n== Kernel-side time per sample at 1 Hz, the host as it is and with {extra} more sleeping threads\n   \
         ({SLEEPER_PROCS} processes × {SLEEPER_THREADS} threads outside the slice; 4 sleeping workers inside;\n   \
         median over {KERNEL_BEATS} samples of the kernel-side time each 1 s interval cost: collector.self.kernel_s\n   \
         where the heartbeat has it, else the run_time_ns of all the daemon's BPF programs, event probes included)"
    );
    let cg = TestCgroup::new("bench_tasks");
    cg.mkdir("rbee.slice");
    let _workers: Vec<Workload> = (0..4)
        .map(|i| {
            Workload::start(&args.load, &cg.mkdir(&format!("rbee.slice/llm/{}", 8080 + i)), &["sleep", "600"])
        })
        .collect();
    let outside = cg.mkdir("outside");
    let me = std::env::current_exe().expect("own path");
    let _stats = BpfStats::enable();
    println!(
        "{:<28} {:>8} {:>18} {:>13} {:>11}  source",
        "condition", "tasks", "kernel ms/sample", "BPF runs/s", "CPU % core"
    );
    let mut out = Vec::new();
    let mut sleepers = Vec::new();
    for with_sleepers in [false, true] {
        if with_sleepers {
            let threads = SLEEPER_THREADS.to_string();
            sleepers = (0..SLEEPER_PROCS)
                .map(|_| Workload::start(me.to_str().unwrap(), &outside, &["threads", &threads, "600"]))
                .collect();
            let deadline = Instant::now() + Duration::from_secs(60);
            while cgroup_threads(&outside) < extra && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let tasks = host_tasks();
        let daemon = Daemon::start(args, &cg, "tasks");
        daemon.next();
        daemon.next();
        let beats: Vec<Beat> = (0..=KERNEL_BEATS).map(|_| daemon.next()).collect();
        let pid = daemon.pid();
        let hwm = proc_field(pid, "status", "VmHWM:");
        drop(daemon);
        let (ms, source, per) = kernel_ms_per_sample(&beats);
        let (first, last) = (&beats[0], &beats[beats.len() - 1]);
        let wall = (last.at - first.at).as_secs_f64();
        let cpu_pct = last.cpu_ns.saturating_sub(first.cpu_ns) as f64 / 1e9 / wall * 100.0;
        let runs = match (first.bpf, last.bpf) {
            (Some(a), Some(b)) => Some(b.runs.saturating_sub(a.runs) as f64 / wall),
            _ => None,
        };
        let label =
            if with_sleepers { format!("+ {extra} sleeping threads") } else { "host as it is".into() };
        println!(
            "{label:<28} {tasks:>8} {:>18} {:>13} {cpu_pct:>11.2}  {source}",
            ms.map_or("n/a".into(), |m| format!("{m:.3}")),
            runs.map_or("n/a".into(), |r| format!("{r:.0}")),
        );
        out.push(json!({
            "condition": label, "host_tasks": tasks, "kernel_ms_per_sample": ms, "per_sample_ms": per,
            "source": source, "bpf_runs_per_s": runs, "daemon_cpu_pct_of_core": cpu_pct,
            "daemon_peak_rss_kib": hwm, "collector_self": self_summary(&beats),
        }));
    }
    drop(sleepers);
    json!(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(line: &str, run_ns: u64) -> Beat {
        Beat {
            at: Instant::now(),
            cpu_ns: 0,
            bpf: Some(BpfRun { run_ns, runs: 1, programs: 1 }),
            self_cost: serde_json::from_str::<Value>(line).ok().as_ref().and_then(self_cost),
        }
    }

    #[test]
    fn kernel_time_prefers_collector_self() {
        let with = r#"{"collector":{"self":{"cpu_s":0.01,"rss_bytes":1e7,"kernel_s":0.002}}}"#;
        let beats = [beat(with, 0), beat(with, 5_000_000), beat(with, 10_000_000)];
        let (ms, source, per) = kernel_ms_per_sample(&beats);
        assert_eq!((ms, source, per.len()), (Some(2.0), "collector.self.kernel_s", 3));
        assert_eq!(self_summary(&beats)["kernel_s_median"], json!(0.002));
    }

    #[test]
    fn kernel_time_falls_back_to_bpf_run_time() {
        let without = r#"{"collector":{"cpu":"bpf"}}"#;
        let beats = [beat(without, 0), beat(without, 1_000_000), beat(without, 4_000_000)];
        let (ms, source, per) = kernel_ms_per_sample(&beats);
        assert_eq!((ms, source, per), (Some(2.0), "bpf_stats run_time_ns (fdinfo)", vec![1.0, 3.0]));
        assert_eq!(self_summary(&beats), Value::Null);
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn the_ratio_interval_holds_the_ratio_and_narrows_with_the_noise() {
        let noisy = [90.0, 110.0, 95.0, 105.0, 100.0, 80.0, 120.0, 100.0, 98.0];
        let (lo, hi) = ratio_interval(&noisy, &noisy).unwrap();
        assert!(lo < 1.0 && hi > 1.0, "{lo}–{hi}");
        let quiet = [100.0, 100.5, 99.5, 100.2, 99.8, 100.1, 99.9, 100.0, 100.3];
        let slower: Vec<f64> = quiet.iter().map(|v| v * 0.95).collect();
        let (lo2, hi2) = ratio_interval(&quiet, &slower).unwrap();
        assert!(hi2 < 0.99 && lo2 > 0.9 && hi2 - lo2 < hi - lo, "{lo2}–{hi2}");
        assert_eq!(ratio_interval(&quiet[..3], &slower), None, "too few rounds");
    }
}
