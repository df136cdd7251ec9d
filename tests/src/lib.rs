//! Helpers for the privileged integration tests: test cgroups that clean up after
//! themselves, workloads started inside them, and the kernel's own figures to compare with.
use std::{
    ffi::CString,
    io,
    os::unix::{fs::MetadataExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

/// Set by `.ci/run`: a test that cannot load BPF fails instead of skipping.
pub const REQUIRE_BPF: &str = "HIVE_MONITOR_REQUIRE_BPF";

/// Whether this process may load BPF programs here. When it may not, the test is skipped
/// loudly, or fails when `HIVE_MONITOR_REQUIRE_BPF=1`.
pub fn bpf_available(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let reason = if unsafe { libc::geteuid() } != 0 {
        Some("not running as root")
    } else if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        Some("no kernel BTF at /sys/kernel/btf/vmlinux")
    } else if monitor_user::sources::cgroup::detect_root().is_err() {
        Some("no cgroup2 mount")
    } else {
        None
    };
    let Some(reason) = reason else { return true };
    if std::env::var(REQUIRE_BPF).is_ok_and(|v| v == "1") {
        panic!("{test}: needs BPF but {reason}, and {REQUIRE_BPF}=1 forbids skipping");
    }
    eprintln!("SKIPPED {test}: needs BPF but {reason} (set {REQUIRE_BPF}=1 to make this a failure)");
    false
}

/// The path of program `tool` on `PATH` (installed by `scripts/setup`). Without it the test
/// is skipped loudly, or fails when `HIVE_MONITOR_REQUIRE_BPF=1` (which CI sets to forbid
/// every skip).
pub fn tool(test: &str, tool: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file());
    if found.is_none() {
        let why = format!("needs `{tool}` (Debian's prometheus package; scripts/setup installs it)");
        if std::env::var(REQUIRE_BPF).is_ok_and(|v| v == "1") {
            panic!("{test}: {why}, and {REQUIRE_BPF}=1 forbids skipping");
        }
        eprintln!("SKIPPED {test}: {why} (set {REQUIRE_BPF}=1 to make this a failure)");
    }
    found
}

/// This process's cgroup in the hierarchy `name` (`""` for v2), relative to its root.
pub fn own_cgroup(name: &str) -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").expect("read /proc/self/cgroup");
    text.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers.split(',').any(|c| c == name).then(|| PathBuf::from(path.trim_start_matches('/')))
    })
}

pub fn own_v2_cgroup() -> PathBuf {
    own_cgroup("").expect("no v2 entry in /proc/self/cgroup")
}

/// A cgroup tree this test created beneath its own cgroup, in the v2 hierarchy and optionally
/// at the same relative path in v1 hierarchies. Dropping it (also while a failing test
/// unwinds) kills what runs inside and removes every directory it created or holds.
pub struct TestCgroup {
    pub root: PathBuf,
    /// `dir` relative to the cgroup2 root.
    pub rel: PathBuf,
    pub dir: PathBuf,
    /// This test's directory in every hierarchy, removed with all it holds.
    own: Vec<PathBuf>,
    /// Directories above them that tests of this process created, parents first; shared
    /// with the tests running beside this one, so counted in `SHARED_PARENTS`.
    parents: Vec<PathBuf>,
}

/// Parent directories the tests of this process created, with how many tests use each: the
/// last one out removes it.
static SHARED_PARENTS: std::sync::Mutex<Vec<(PathBuf, usize)>> = std::sync::Mutex::new(Vec::new());

impl TestCgroup {
    /// `<own v2 cgroup>/hm-test-<pid>-<name>`.
    pub fn new(name: &str) -> Self {
        Self::create(own_v2_cgroup(), name, &[])
    }

    /// The same test directory in v2 and in each v1 hierarchy in `controllers` (mounted at
    /// `/sys/fs/cgroup/<controller>`), at one relative path beneath this process's cgroup in
    /// all of them. `None` when no such path exists (no v1 mount, or own cgroups that do not
    /// nest), or on a unified host.
    pub fn with_v1(name: &str, controllers: &[&str]) -> Option<Self> {
        let mut owns = vec![own_v2_cgroup()];
        for c in controllers {
            if !Path::new("/sys/fs/cgroup").join(c).join("cgroup.procs").exists() {
                return None;
            }
            owns.push(own_cgroup(c)?);
        }
        let deepest = owns.iter().max_by_key(|p| p.components().count())?.clone();
        owns.iter().all(|p| deepest.starts_with(p)).then(|| Self::create(deepest, name, controllers))
    }

    fn create(base: PathBuf, name: &str, controllers: &[&str]) -> Self {
        let root = monitor_user::sources::cgroup::detect_root().expect("cgroup2 root");
        let rel = base.join(format!("hm-test-{}-{name}", std::process::id()));
        let (mut own, mut parents) = (Vec::new(), Vec::new());
        let mut shared = SHARED_PARENTS.lock().unwrap_or_else(|e| e.into_inner());
        let roots = std::iter::once(root.clone())
            .chain(controllers.iter().map(|c| Path::new("/sys/fs/cgroup").join(c)));
        for hierarchy in roots {
            let mut dir = hierarchy.clone();
            for part in base.components() {
                dir.push(part);
                if let Some(entry) = shared.iter_mut().find(|(p, _)| *p == dir) {
                    entry.1 += 1;
                    parents.push(dir.clone());
                } else if !dir.exists() {
                    std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
                    shared.push((dir.clone(), 1));
                    parents.push(dir.clone());
                }
            }
            let mine = hierarchy.join(&rel);
            std::fs::create_dir(&mine).unwrap_or_else(|e| panic!("mkdir {}: {e}", mine.display()));
            own.push(mine);
        }
        let dir = root.join(&rel);
        Self { root, rel, dir, own, parents }
    }

    /// Creates `path` (relative to this test cgroup) with its parents, in v2.
    pub fn mkdir(&self, path: &str) -> PathBuf {
        let dir = self.dir.join(path);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        dir
    }

    /// Path of a child relative to the cgroup2 root, as `--slice` takes it.
    pub fn rel(&self, path: &str) -> String {
        self.rel.join(path).to_string_lossy().into_owned()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(5);
        while populated(&self.dir) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        for dir in &self.own {
            remove_tree(dir);
        }
        let mut shared = SHARED_PARENTS.lock().unwrap_or_else(|e| e.into_inner());
        for dir in self.parents.iter().rev() {
            if let Some(i) = shared.iter().position(|(p, _)| p == dir) {
                shared[i].1 -= 1;
                if shared[i].1 == 0 {
                    shared.remove(i);
                    let _ = std::fs::remove_dir(dir);
                }
            }
        }
    }
}

fn populated(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.events"))
        .map(|t| t.lines().any(|l| l == "populated 1"))
        .unwrap_or(false)
}

fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    if let Err(e) = std::fs::remove_dir(dir) {
        if e.kind() != io::ErrorKind::NotFound {
            eprintln!("could not remove test cgroup {}: {e}", dir.display());
        }
    }
}

/// A process started inside a cgroup; killed and reaped when dropped.
pub struct Workload {
    pub child: Child,
}

impl Workload {
    /// Runs `exe ARGS…` with its first instruction already inside `cgroup`.
    pub fn start(exe: &str, cgroup: &Path, args: &[&str]) -> Self {
        Self::start_in(exe, &[cgroup], args)
    }

    /// Runs `exe ARGS…` with its first instruction already inside each of `cgroups` (one per
    /// hierarchy).
    pub fn start_in(exe: &str, cgroups: &[&Path], args: &[&str]) -> Self {
        let child = command_in(exe, cgroups, args)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {exe} {args:?} in {cgroups:?}: {e}"));
        Self { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// `exe ARGS…`, to be run with its first instruction already inside each of `cgroups` (one
/// per hierarchy).
pub fn command_in(exe: &str, cgroups: &[&Path], args: &[&str]) -> Command {
    let procs: Vec<CString> = cgroups
        .iter()
        .map(|c| CString::new(c.join("cgroup.procs").as_os_str().as_encoded_bytes()).unwrap())
        .collect();
    let mut cmd = Command::new(exe);
    cmd.args(args);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            for path in &procs {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
                libc::close(fd);
                if !ok {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The kernel's CPU time for a cgroup and all below it: `cpu.stat` `usage_usec`, in ns.
pub fn cpu_stat_ns(cgroup: &Path) -> u64 {
    let text = std::fs::read_to_string(cgroup.join("cpu.stat")).expect("read cpu.stat");
    let usec: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
        .expect("usage_usec in cpu.stat");
    usec * 1000
}

pub fn cgroup_id(cgroup: &Path) -> u64 {
    std::fs::metadata(cgroup).expect("stat cgroup").ino()
}

/// Freezes a cgroup tree and waits until the kernel has charged all its CPU time, so
/// `cpu.stat` is exact. Returns CLOCK_MONOTONIC ns when the freezer reported the tree frozen.
///
/// "frozen 1" is reported when each task enters the freezer, just before it schedules out:
/// its last slice of CPU time is charged a moment later, so the charge is waited for too.
pub fn freeze(cgroup: &Path) -> u64 {
    std::fs::write(cgroup.join("cgroup.freeze"), "1").expect("write cgroup.freeze");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let events = std::fs::read_to_string(cgroup.join("cgroup.events")).expect("read cgroup.events");
        if events.lines().any(|l| l == "frozen 1") {
            break;
        }
        assert!(Instant::now() < deadline, "{} did not freeze within 5 s", cgroup.display());
        std::thread::sleep(Duration::from_micros(200));
    }
    let frozen_at = monitor_user::probes::monotonic_ns();
    let mut last = cpu_stat_ns(cgroup);
    loop {
        std::thread::sleep(Duration::from_millis(1));
        let now = cpu_stat_ns(cgroup);
        if now == last {
            return frozen_at;
        }
        assert!(Instant::now() < deadline, "{} still charged CPU time 5 s after freezing", cgroup.display());
        last = now;
    }
}

pub fn thaw(cgroup: &Path) {
    std::fs::write(cgroup.join("cgroup.freeze"), "0").expect("write cgroup.freeze");
}

/// Per-thread kernel scheduler figures of a process, summed over its threads:
/// (`/proc/<pid>/task/*/schedstat` run_delay ns, voluntary, involuntary switches).
pub fn sched_figures(pid: u32) -> (u64, u64, u64) {
    let mut totals = (0, 0, 0);
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("read task dir").flatten() {
        let p = task.path();
        let Ok(schedstat) = std::fs::read_to_string(p.join("schedstat")) else { continue };
        let Ok(status) = std::fs::read_to_string(p.join("status")) else { continue };
        totals.0 += schedstat.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        totals.1 += field("voluntary_ctxt_switches:");
        totals.2 += field("nonvoluntary_ctxt_switches:");
    }
    totals
}

/// The scripted NVML library (`nvml-stub`), built beside the test binaries.
pub fn nvml_stub() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let lib = exe.parent().expect("deps directory").join("libnvidia_ml.so");
    assert!(lib.exists(), "{} missing: it is built with the tests package", lib.display());
    lib
}

/// A free loopback port, for a server a test starts.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A `name:  value` line of a `/proc` file of process `pid` (`status`, `io`), as a number;
/// a trailing `kB` is dropped, so `VmRSS:` reads in kB.
pub fn proc_field(pid: u32, file: &str, name: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).expect("read /proc file");
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .unwrap_or_else(|| panic!("{name} in /proc/{pid}/{file}"));
    value.trim().trim_end_matches("kB").trim().parse().unwrap_or_else(|_| panic!("{name} {value:?}"))
}

/// Polls `done` every 20 ms until it holds; panics after `limit`, naming `what`.
pub fn wait_for(mut done: impl FnMut() -> bool, limit: std::time::Duration, what: &str) {
    let end = std::time::Instant::now() + limit;
    while !done() {
        assert!(std::time::Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Pins the process `cmd` starts to CPU `cpu`, between fork and exec.
pub fn pin_to_cpu(cmd: &mut Command, cpu: usize) {
    // SAFETY: sched_setaffinity is a plain system call, safe between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Reads `exe` and every file this process maps (the C library and the loader, which a
/// load shares) into the page cache. A load started on a cold machine would otherwise read
/// its own code in from disk, counted as its storage reads, on top of the bytes it moves.
pub fn page_in(exe: &str) {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("read /proc/self/maps");
    let mapped = maps.lines().filter_map(|l| l.split_whitespace().nth(5)).filter(|p| p.starts_with('/'));
    let mut files: Vec<&str> = mapped.chain([exe]).collect();
    files.sort_unstable();
    files.dedup();
    for file in files {
        std::fs::read(file).unwrap_or_else(|e| panic!("read {file}: {e}"));
    }
}
