//! System-call level I/O per worker against `/proc/<pid>/io` (`rchar`, `wchar`) of the same
//! process and against the bytes the workload knows it moved.
use std::{path::Path, time::Duration};

use hive_monitor_tests::*;
use monitor_user::{sampler::Sampler, sources::cgroup::Slice};

const HM_LOAD: &str = env!("CARGO_BIN_EXE_hm-load");
const MIB: u64 = 1 << 20;

/// `rchar` and `wchar` of a process.
fn proc_io(pid: u32) -> (u64, u64) {
    (proc_field(pid, "io", "rchar:"), proc_field(pid, "io", "wchar:"))
}

fn wait_for(pid: u32, bytes: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while {
        let (r, w) = proc_io(pid);
        r < bytes || w < bytes
    } {
        assert!(std::time::Instant::now() < deadline, "the load did not move {bytes} bytes");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100)); // idle now
}

fn within_1pct(ours: u64, theirs: u64) -> bool {
    ours.abs_diff(theirs) as f64 <= theirs as f64 * 0.01
}

#[test]
fn syscall_bytes_match_rchar_and_wchar() {
    if !bpf_available("io_syscall") {
        return;
    }
    let cg = TestCgroup::new("io");
    let (files, pipes) = (cg.mkdir("rbee.slice/io/files"), cg.mkdir("rbee.slice/io/pipes"));
    let mut sampler = Sampler::new(Slice::new(&cg.root, &cg.rel("rbee.slice")).unwrap()).unwrap();
    let path = std::env::temp_dir().join(format!("hm-io-{}", std::process::id()));
    let rw = Workload::start(HM_LOAD, &files, &["rw", path.to_str().unwrap(), "32", "60"]);
    let pipe = Workload::start(HM_LOAD, &pipes, &["pipe", "64", "60"]);
    wait_for(rw.pid(), 32 * MIB);
    wait_for(pipe.pid(), 64 * MIB);
    let sample = sampler.sample().unwrap();
    let _ = std::fs::remove_file(&path);

    for (instance, load, moved) in [("files", &rw, 32 * MIB), ("pipes", &pipe, 64 * MIB)] {
        let w = sample.workers.iter().find(|w| w.cgroup.instance == instance).unwrap();
        let (rchar, wchar) = proc_io(load.pid());
        let (ours_r, ours_w) = (w.counters.syscall_read_bytes, w.counters.syscall_write_bytes);
        eprintln!("io {instance}: monitor read {ours_r} write {ours_w}; /proc io rchar {rchar} wchar {wchar}; moved {moved}");
        assert!(
            within_1pct(ours_r, rchar) && within_1pct(ours_w, wchar),
            "{instance}: {ours_r}/{ours_w} vs {rchar}/{wchar}"
        );
        assert!(
            within_1pct(ours_r, moved) && within_1pct(ours_w, moved),
            "{instance}: {ours_r}/{ours_w} vs {moved} moved"
        );
    }
    assert!(Path::new("/proc/self/io").exists());
}

fn proc_read_bytes(pid: u32) -> u64 {
    proc_field(pid, "io", "read_bytes:")
}

#[test]
fn storage_reads_match_read_bytes() {
    if !bpf_available("io_storage") {
        return;
    }
    let cg = TestCgroup::new("io_storage");
    // The slice exists before the probes start: they count nothing until it does.
    cg.mkdir("rbee.slice");
    let mut sampler = Sampler::new(Slice::new(&cg.root, &cg.rel("rbee.slice")).unwrap()).unwrap();
    // On the disk the build uses (a tmpfs /tmp would never reach a block device).
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let mut loads = Vec::new();
    for mode in ["coldread", "mmapread"] {
        let worker = cg.mkdir(&format!("rbee.slice/io/{mode}"));
        let file = dir.join(format!("hm-{mode}-{}", std::process::id()));
        loads.push((
            mode,
            file.clone(),
            Workload::start(HM_LOAD, &worker, &[mode, file.to_str().unwrap(), "32", "60"]),
        ));
    }
    for (_, _, load) in &loads {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while proc_read_bytes(load.pid()) < 31 * MIB {
            assert!(std::time::Instant::now() < deadline, "the load never read its file back from disk");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let sample = sampler.sample().unwrap();
    for (mode, file, load) in &loads {
        let _ = std::fs::remove_file(file);
        let w = sample.workers.iter().find(|w| w.cgroup.instance == *mode).unwrap();
        let (ours, theirs) = (w.counters.storage_read_bytes, proc_read_bytes(load.pid()));
        eprintln!("io {mode}: monitor storage read {ours}; /proc io read_bytes {theirs}; file {}", 32 * MIB);
        assert!(within_1pct(ours, theirs), "{mode}: {ours} vs read_bytes {theirs}");
        assert!(within_1pct(ours, 32 * MIB) || ours > 32 * MIB, "{mode}: {ours} of a 32 MiB file");
    }
}
