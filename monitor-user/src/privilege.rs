//! What the daemon keeps once its probes are loaded. Loading and attaching needs CAP_BPF and
//! CAP_PERFMON (or root's full set); afterwards the maps and ring buffer are used through
//! descriptors already held, which needs no capability. What remains is reading other
//! users' processes: `/proc/<pid>/io` (the no-BPF fallback) needs CAP_SYS_PTRACE, and
//! walking their `/proc` and cgroup directories CAP_DAC_READ_SEARCH. Everything else is
//! dropped from the effective, permitted, inheritable, ambient and bounding sets, and no
//! execve can give any of it back (`no_new_privs`). One exception: before Linux 6.5, with
//! unprivileged BPF disabled (Debian's default), every `bpf()` call needs CAP_BPF, even a map
//! lookup or reading an iterator; there CAP_BPF is kept too.
use caps::{CapSet, Capability, CapsHashSet};

use crate::error::{Error, Result};

/// The capabilities kept for the daemon's life.
pub const KEPT: [Capability; 2] = [Capability::CAP_SYS_PTRACE, Capability::CAP_DAC_READ_SEARCH];

pub fn drop_unneeded() -> Result<()> {
    let err = |what: &str, e: caps::errors::CapsError| Error::Privilege(format!("{what}: {e}"));
    let mut keep: CapsHashSet = KEPT.into_iter().collect();
    if every_bpf_call_needs_cap_bpf() {
        keep.insert(Capability::CAP_BPF);
    }
    // The bounding set first: dropping from it takes CAP_SETPCAP, itself about to go.
    let bounding = caps::read(None, CapSet::Bounding).map_err(|e| err("reading the bounding set", e))?;
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).unwrap_or(false) {
        for cap in bounding.difference(&keep) {
            caps::drop(None, CapSet::Bounding, *cap).map_err(|e| err("dropping from the bounding set", e))?;
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(|e| err("clearing the ambient set", e))?;
    for set in [CapSet::Inheritable, CapSet::Effective, CapSet::Permitted] {
        let now = caps::read(None, set).map_err(|e| err("reading a capability set", e))?;
        let kept: CapsHashSet = now.intersection(&keep).copied().collect();
        caps::set(None, set, &kept).map_err(|e| err("setting a capability set", e))?;
    }
    // SAFETY: prctl with constant arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(Error::Privilege(format!("no_new_privs: {}", std::io::Error::last_os_error())));
    }
    let mut left: Vec<String> = caps::read(None, CapSet::Effective)
        .map_err(|e| err("reading the effective set", e))?
        .iter()
        .map(|c| c.to_string())
        .collect();
    left.sort();
    log::info!(
        "capabilities kept after loading the probes: {}",
        if left.is_empty() { "none".into() } else { left.join(", ") }
    );
    Ok(())
}

/// Starts a thread named `name` that first gives up every capability. Capabilities belong to
/// each thread: one started before `drop_unneeded` (the pull API binds before the probes
/// load) would otherwise keep root's full set for the daemon's life. None of the daemon's
/// helper threads needs any.
pub fn spawn_unprivileged<F, T>(name: &str, f: F) -> std::io::Result<std::thread::JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    std::thread::Builder::new().name(name.to_string()).spawn(move || {
        if let Err(e) = drop_all() {
            log::warn!("thread {:?} keeps its capabilities: {e}", std::thread::current().name());
        }
        f()
    })
}

fn drop_all() -> std::result::Result<(), caps::errors::CapsError> {
    caps::clear(None, CapSet::Ambient)?;
    for set in [CapSet::Inheritable, CapSet::Effective, CapSet::Permitted] {
        caps::clear(None, set)?;
    }
    // SAFETY: prctl with constant arguments; it affects this thread only.
    unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    Ok(())
}

/// Whether this kernel refuses any `bpf()` call without CAP_BPF: before 6.5 the check of
/// `kernel.unprivileged_bpf_disabled` guarded the whole system call.
fn every_bpf_call_needs_cap_bpf() -> bool {
    let disabled = std::fs::read_to_string("/proc/sys/kernel/unprivileged_bpf_disabled")
        .map(|v| v.trim() != "0")
        .unwrap_or(true);
    disabled && kernel_version().is_none_or(|v| v < (6, 5))
}

/// The running kernel's (major, minor) version.
fn kernel_version() -> Option<(u32, u32)> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}
