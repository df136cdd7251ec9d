//! Builds `monitor-ebpf` for the BPF target and leaves the object in OUT_DIR, where
//! `probes::load` embeds it. The toolchain is the one `scripts/setup` installs (see its header).
//!
//! aya-build reports the nested cargo's every line as a `cargo:warning`, so cargo would print
//! its ordinary progress as warnings. This script therefore runs itself again to do the
//! build, passes on the instructions to cargo, and shows the nested build's output only when
//! it fails.
use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use anyhow::{anyhow, bail, Context as _};

/// Set in the child run of this script: the one that calls aya-build.
const CHILD: &str = "HIVE_MONITOR_EBPF_BUILD_CHILD";

fn main() -> anyhow::Result<()> {
    if std::env::var_os(CHILD).is_some() {
        return build_ebpf();
    }
    let me = std::env::current_exe().context("locating the build script")?;
    let out =
        Command::new(me).env(CHILD, "1").stdin(Stdio::null()).output().context("running the eBPF build")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (output, instructions): (Vec<&str>, Vec<&str>) =
        stdout.lines().partition(|l| l.starts_with("cargo:warning=") || !l.starts_with("cargo:"));
    for line in instructions {
        println!("{line}");
    }
    if !out.status.success() {
        // Cargo shows a failed build script's standard error.
        let mut err = std::io::stderr().lock();
        for line in output {
            let _ = writeln!(err, "{}", line.strip_prefix("cargo:warning=").unwrap_or(line));
        }
        let _ = err.write_all(&out.stderr);
        bail!("building the eBPF program failed (its output is above)");
    }
    Ok(())
}

fn build_ebpf() -> anyhow::Result<()> {
    // Debian's rustc is a stable release: -Z build-std=core needs unstable features, but only for
    // the child cargo that builds the probes, never for the host crates built here.
    std::env::set_var("RUSTC_BOOTSTRAP", "1");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("monitor-user has no parent directory")?
        .join("monitor-ebpf");
    let root = root.to_str().ok_or_else(|| anyhow!("non-UTF-8 path {}", root.display()))?;
    println!("cargo:rerun-if-changed=../monitor-common/src");
    aya_build::build_ebpf(
        [aya_build::Package { name: "monitor-ebpf", root_dir: root, ..Default::default() }],
        aya_build::Toolchain::Custom("bpf-debian"),
    )
    .context("building the eBPF program failed; has `scripts/setup` run? (`cargo xtask build` runs it)")
}
