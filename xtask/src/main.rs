//! `cargo xtask build | run | demo | test | test-kernels | bench | fuzz`: the developer's entry points. Each first runs
//! `scripts/setup`, which installs the eBPF toolchain when it is missing and otherwise
//! returns in a fraction of a second.
use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

mod demo;
mod kernels;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the release daemon, eBPF object embedded, at target/release/hive-monitor.
    Build,
    /// Build, then run `hive-monitor run` with these arguments (as root).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build, then start three demo workers through `hive-monitor spawn` (a busy llm/8080
    /// serving a named model, one writing files in bursts, an idle one), the daemon, and
    /// `top` (as root); all of it is removed on exit and on Ctrl-C.
    Demo {
        /// Use this daemon binary instead of building target/release/hive-monitor.
        #[arg(long)]
        daemon: Option<PathBuf>,
        /// No `top`: print the daemon's heartbeats for this many seconds, then clean up.
        #[arg(long)]
        seconds: Option<u64>,
        #[arg(long, default_value = "rbee.slice")]
        slice: String,
        /// The cgroup2 mount [default: detected].
        #[arg(long)]
        cgroup_root: Option<PathBuf>,
        /// Where the daemon's pull API listens, for `top`.
        #[arg(long, default_value = "127.0.0.1:7836")]
        listen: String,
    },
    /// Measure the monitor's cost and accuracy (as root), then fuzz each parser briefly:
    /// prints tables and writes the figures to target/bench/bench.json and fuzz.json.
    Bench {
        /// Only these sections (comma-separated: ebpf_cost, host_cost, kernel_time, daemon,
        /// cpu_accuracy, io_accuracy, record); the fuzzers then do not run.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Alternating rounds of each host-cost case: more narrow each ratio's interval, at
        /// about 30 s a round.
        #[arg(long, default_value_t = 9)]
        rounds: usize,
        /// Run the host-cost section as an A/A control: the daemon starts in neither half, so
        /// each ratio shows the machine's own scatter.
        #[arg(long)]
        control: bool,
    },
    /// Run each fuzz target (cargo fuzz, libFuzzer) for a bounded time and print the
    /// executions reached; writes target/bench/fuzz.json.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
    /// Run every test (the workspace's default members: all but the BPF-only crate), the
    /// privileged ones against the running kernel.
    Test {
        /// Passed to `cargo test` (e.g. `-- --nocapture`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The kernel matrix (as root): fetch the newest Debian cloud kernel of each suite into
    /// target/kernels (cached), check the BTF layout test against each, boot each in qemu
    /// (TCG) and compare the daemon's figures with the guest kernel's own; prints a table and
    /// writes target/kernels/matrix.json.
    TestKernels {
        /// Only these kernels (bullseye, bookworm, trixie, trixie-backports, sid).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Refresh the package lists even if they are less than a day old.
        #[arg(long)]
        refresh: bool,
        /// Guests booted at a time (two at a time take about two thirds of the time on 2 cores).
        #[arg(long, default_value_t = 2)]
        jobs: usize,
        /// Seconds each guest may run before it is killed and counted failed.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// Shorter loads and fewer intervals (a smoke test of the harness).
        #[arg(long)]
        quick: bool,
        /// Only fetch the kernels and extract their BTF.
        #[arg(long)]
        fetch_only: bool,
        /// Do not run the layout test over the extracted BTF (when working on the harness).
        #[arg(long)]
        skip_layout: bool,
        /// Boot this daemon binary instead of target/release/hive-monitor.
        #[arg(long)]
        daemon: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match xtask(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn xtask(cli: Cli) -> Result<()> {
    let root = workspace_root();
    setup(&root)?;
    match cli.command {
        Cmd::Build => build(&root),
        Cmd::Run { args } => {
            build(&root)?;
            let daemon = root.join("target/release/hive-monitor");
            let args = if args.is_empty() { vec!["run".to_string()] } else { args };
            run(Command::new(daemon).args(args))
        }
        Cmd::Demo { daemon, seconds, slice, cgroup_root, listen } => {
            let daemon = match daemon {
                Some(daemon) => daemon,
                None => {
                    build(&root)?;
                    root.join("target/release/hive-monitor")
                }
            };
            demo::demo(demo::Opts { daemon, seconds, slice, cgroup_root, listen })
        }
        Cmd::Bench { only, rounds, control } => {
            // perf, hackbench, nginx, wrk; without them hm-bench skips those workloads, saying so.
            if let Err(e) = run(Command::new("bash").arg(root.join("scripts/bench-deps"))) {
                eprintln!("xtask: {e:#}");
            }
            run(Command::new(cargo()).current_dir(&root).args([
                "build",
                "--release",
                "--package",
                "monitor-user",
                "--package",
                "hive-monitor-tests",
                "--bins",
            ]))?;
            let release = root.join("target/release");
            let dir = root.join("target/bench");
            run(Command::new(release.join("hm-bench"))
                .arg("--daemon")
                .arg(release.join("hive-monitor"))
                .arg("--load")
                .arg(release.join("hm-load"))
                .arg("--out")
                .arg(dir.join("bench.json"))
                .arg("--scratch")
                .arg(&dir)
                .args(["--rounds", &rounds.to_string()])
                .args(control.then_some("--control"))
                .args(only.iter().flat_map(|s| ["--only", s.as_str()])))?;
            match only.is_empty() {
                true => fuzz(&root, BENCH_FUZZ_SECONDS),
                false => Ok(()),
            }
        }
        Cmd::Fuzz { seconds } => fuzz(&root, seconds),
        Cmd::Test { args } => run(Command::new(cargo()).current_dir(&root).arg("test").args(args)),
        Cmd::TestKernels { only, refresh, jobs, timeout, quick, fetch_only, skip_layout, daemon } => {
            let opts = kernels::Opts { only, refresh, jobs, timeout, quick, fetch_only, skip_layout, daemon };
            kernels::test_kernels(&root, opts)
        }
    }
}

/// Seconds per fuzz target when the bench runs them.
const BENCH_FUZZ_SECONDS: u64 = 20;
/// Every parser the daemon exposes to the network or to files (`fuzz/fuzz_targets`).
const FUZZ_TARGETS: [&str; 5] = ["config", "heartbeat", "ack", "workers_query", "telemetry"];
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Builds the fuzz targets (without a sanitizer: the code under test is safe Rust, and the
/// stable compiler has none), runs each for `seconds` from its seeds, and reports.
fn fuzz(root: &Path, seconds: u64) -> Result<()> {
    if !Command::new(cargo()).args(["fuzz", "--version"]).output().is_ok_and(|o| o.status.success()) {
        run(Command::new(cargo()).args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            CARGO_FUZZ_VERSION,
        ]))?;
    }
    let dir = root.join("fuzz");
    // cargo-fuzz passes flags the stable compiler accepts only this way, as the eBPF build does.
    let cargo_fuzz = |args: &[&str]| {
        let mut cmd = Command::new(cargo());
        cmd.current_dir(&dir).env("RUSTC_BOOTSTRAP", "1").arg("fuzz").args(args).args([
            "--sanitizer",
            "none",
            "-O",
        ]);
        cmd
    };
    run(&mut cargo_fuzz(&["build"]))?;
    let mut rows = Vec::new();
    println!("\n== Fuzzing: each parser for {seconds} s (libFuzzer, from fuzz/seeds)");
    println!("{:<16} {:>12} {:>10} {:>8}", "target", "executions", "exec/s", "crashes");
    for target in FUZZ_TARGETS {
        let corpus = dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        let out = cargo_fuzz(&["run", target])
            .arg(&corpus)
            .arg(dir.join("seeds").join(target))
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .output()
            .with_context(|| format!("cargo fuzz run {target}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        let runs: u64 =
            log.lines().find_map(|l| l.strip_prefix("Done ")?.split(' ').next()?.parse().ok()).unwrap_or(0);
        let crashed = !out.status.success();
        if crashed {
            eprintln!("{log}");
        }
        println!("{target:<16} {runs:>12} {:>10} {:>8}", runs / seconds.max(1), u8::from(crashed));
        rows.push(serde_json::json!({ "target": target, "seconds": seconds, "executions": runs, "crashed": crashed }));
    }
    let report = root.join("target/bench/fuzz.json");
    std::fs::create_dir_all(report.parent().expect("target/bench"))?;
    std::fs::write(&report, serde_json::to_string_pretty(&rows)?)?;
    println!("figures written to {}", report.display());
    if rows.iter().any(|r| r["crashed"] == true) {
        bail!("a fuzz target crashed; the input is under fuzz/artifacts");
    }
    Ok(())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

fn setup(root: &Path) -> Result<()> {
    run(Command::new("bash").arg(root.join("scripts/setup"))).context("scripts/setup failed")
}

fn build(root: &Path) -> Result<()> {
    let packages = ["--package", "monitor-user", "--package", "monitor-coordinator"];
    run(Command::new(cargo()).current_dir(root).args(["build", "--release"]).args(packages))
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
