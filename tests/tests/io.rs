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
        let w = sample.workers.iter().find(|w| *w.cgroup.instance == *instance).unwrap();
        let (rchar, wchar) = proc_io(load.pid());
        let (ours_r, ours_w) = (w.totals.syscall_read_bytes.unwrap(), w.totals.syscall_write_bytes.unwrap());
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

/// `read_bytes` and `write_bytes` of a process.
fn proc_storage(pid: u32) -> (u64, u64) {
    (proc_field(pid, "io", "read_bytes:"), proc_field(pid, "io", "write_bytes:"))
}

/// One storage workload: what it does, and the bytes it knows it reads and writes.
struct StorageCase {
    mode: &'static str,
    read: u64,
    written: u64,
}

#[test]
fn storage_bytes_match_read_and_write_bytes() {
    if !bpf_available("io_storage") {
        return;
    }
    const MOVED: u64 = 32 * MIB;
    let cases = [
        // Writes and fsyncs its file, drops it from the page cache, read()s it.
        StorageCase { mode: "coldread", read: MOVED, written: MOVED },
        // The same, reading through a mapping: page faults submit the reads.
        StorageCase { mode: "mmapread", read: MOVED, written: MOVED },
        // Buffered write + fsync: counted as dirtied, not again when fsync writes it back.
        StorageCase { mode: "writesync", read: 0, written: MOVED },
        StorageCase { mode: "direct", read: MOVED, written: MOVED },
        // Four children do the I/O and exit before the sample.
        StorageCase { mode: "children", read: MOVED, written: MOVED },
    ];
    let cg = TestCgroup::new("io_storage");
    // The slice exists before the probes start: they count nothing until it does.
    cg.mkdir("rbee.slice");
    let mut sampler = Sampler::new(Slice::new(&cg.root, &cg.rel("rbee.slice")).unwrap()).unwrap();
    // On the disk the build uses (a tmpfs /tmp would never reach a block device).
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let file = |mode: &str| dir.join(format!("hm-{mode}-{}", std::process::id()));
    // On a cold machine a load reads its own code in: 404 KiB on CI, 5 MiB after drop_caches.
    page_in(HM_LOAD);
    let loads: Vec<_> = cases
        .iter()
        .map(|case| {
            let worker = cg.mkdir(&format!("rbee.slice/io/{}", case.mode));
            let path = file(case.mode);
            Workload::start(HM_LOAD, &worker, &[case.mode, path.to_str().unwrap(), "32", "60"])
        })
        .collect();
    for (case, load) in cases.iter().zip(&loads) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let done = || match case.mode {
            "children" => Path::new(&format!("{}.done", file(case.mode).display())).exists(),
            _ => {
                let (r, w) = proc_storage(load.pid());
                r >= case.read && w >= case.written
            }
        };
        while !done() {
            assert!(std::time::Instant::now() < deadline, "{}: the load did not finish", case.mode);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let sample = sampler.sample().unwrap();
    for (case, load) in cases.iter().zip(&loads) {
        let path = file(case.mode);
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(format!("{}.done", path.display()));
        let w = sample.workers.iter().find(|w| *w.cgroup.instance == *case.mode).unwrap();
        let ours = (w.totals.storage_read_bytes.unwrap(), w.totals.storage_write_bytes.unwrap());
        // The children's own /proc/<pid>/io went with them: only the known bytes remain.
        let kernel = (case.mode != "children").then(|| proc_storage(load.pid()));
        eprintln!(
            "io {}: monitor storage read {} write {}; /proc io read_bytes/write_bytes {kernel:?}; \
             moved {}/{}",
            case.mode, ours.0, ours.1, case.read, case.written
        );
        if let Some((read_bytes, write_bytes)) = kernel {
            assert!(
                within_1pct(ours.0, read_bytes),
                "{}: read {} vs read_bytes {read_bytes}",
                case.mode,
                ours.0
            );
            assert!(
                within_1pct(ours.1, write_bytes),
                "{}: written {} vs write_bytes {write_bytes}",
                case.mode,
                ours.1
            );
        }
        // At least what it moved (a process also reads its own pages in), within 1 %.
        for (what, ours, moved) in [("read", ours.0, case.read), ("written", ours.1, case.written)] {
            if moved > 0 {
                assert!(within_1pct(ours, moved), "{}: {what} {ours} vs {moved} moved", case.mode);
            }
        }
    }
}
