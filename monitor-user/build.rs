//! Builds `monitor-ebpf` for the BPF target and leaves the object in OUT_DIR, where
//! `probes::load` embeds it. The toolchain is the one `scripts/setup` installs (see its header).
use anyhow::{anyhow, Context as _};

fn main() -> anyhow::Result<()> {
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
