//! `cargo xtask build | run | test | bench`: the developer's entry points. Each first runs
//! `scripts/setup`, which installs the eBPF toolchain when it is missing and otherwise
//! returns in a fraction of a second.
use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

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
    /// Measure the monitor's cost and accuracy (as root): prints tables and writes the
    /// figures to target/bench/bench.json.
    Bench,
    /// Run every test (the workspace's default members: all but the BPF-only crate), the
    /// privileged ones against the running kernel.
    Test {
        /// Passed to `cargo test` (e.g. `-- --nocapture`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
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
        Cmd::Bench => {
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
                .arg(&dir))
        }
        Cmd::Test { args } => run(Command::new(cargo()).current_dir(&root).arg("test").args(args)),
    }
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
    run(Command::new(cargo()).current_dir(root).args(["build", "--release", "--package", "monitor-user"]))
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
