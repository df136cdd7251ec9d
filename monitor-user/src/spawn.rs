//! `hive-monitor spawn`: creates a worker cgroup in the slice, applies its limits, and runs a
//! command in it from the command's first instruction.
//!
//! The worker's cgroup is made in the v2 hierarchy and, on a hybrid host, also in the v1
//! memory and cpu hierarchies at the same relative path. The v1 side goes through cgroups-rs;
//! the v2 side is plain directory and interface-file work because cgroups-rs only knows a v2
//! hierarchy mounted at `/sys/fs/cgroup`, not the hybrid layout's `/sys/fs/cgroup/unified`.
use std::{
    ffi::CString,
    fs,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use cgroups_rs::fs::{hierarchies::V1, Cgroup, Controllers, CpuResources, MemoryResources, Resources};

use crate::{
    error::{Error, Result},
    sources::cgroup::{is_cgroup2, valid_name, Slice},
};

/// What to run, where, with which limits.
#[derive(Clone, Debug, Default)]
pub struct SpawnSpec {
    pub group: String,
    pub instance: String,
    /// Bytes.
    pub memory_max: Option<u64>,
    /// Cores, e.g. 1.5.
    pub cpu_max: Option<f64>,
    pub user: Option<String>,
    pub env: Vec<(String, String)>,
    /// Leave the cgroup in place when the command exits.
    pub keep: bool,
    pub command: Vec<String>,
}

/// The CFS period CPU limits are expressed in: the kernel's default, 100 ms.
const CPU_PERIOD_US: u64 = 100_000;

/// Signals passed on to the command rather than acted on here.
const FORWARDED: [i32; 6] =
    [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT, libc::SIGUSR1, libc::SIGUSR2];

/// Runs `spec.command` in a new worker cgroup and returns its exit code (128 + the signal
/// number if a signal ended it), like a shell.
pub fn run(slice: &Slice, spec: &SpawnSpec) -> Result<i32> {
    for (what, name) in [("group", &spec.group), ("instance", &spec.instance)] {
        if !valid_name(name) {
            return Err(Error::BadName { what, name: name.clone() });
        }
    }
    let user = spec.user.as_deref().map(User::lookup).transpose()?;
    let mut worker = WorkerCgroup::create(slice, &spec.group, &spec.instance)?;
    worker.apply_limits(spec.memory_max, spec.cpu_max)?;
    let status = worker.run(spec, user.as_ref());
    worker.keep = spec.keep;
    status
}

/// Where a limit is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Placement {
    V2,
    V1,
}

/// The v2 controller if the worker's cgroup has it, else the v1 hierarchy if mounted.
fn placement(
    limit: &'static str,
    controller: &str,
    v2_dir: &Path,
    in_v2: bool,
    in_v1: bool,
) -> Result<Placement> {
    match (in_v2, in_v1) {
        (true, _) => Ok(Placement::V2),
        (false, true) => Ok(Placement::V1),
        (false, false) => Err(Error::LimitUnavailable {
            limit,
            reason: format!(
                "the {controller} controller is not enabled for {} (absent from its cgroup.controllers) \
                 and no cgroup v1 {controller} hierarchy is mounted",
                v2_dir.display()
            ),
        }),
    }
}

/// A worker's cgroups in every hierarchy; removed on drop unless `keep`.
struct WorkerCgroup {
    v2: PathBuf,
    /// The same path in the v1 memory and cpu hierarchies, on a hybrid host.
    v1: Option<Cgroup>,
    v1_dirs: Vec<(Controllers, PathBuf)>,
    /// Directories this spawn created above the worker, deepest last.
    created_parents: Vec<PathBuf>,
    keep: bool,
}

impl WorkerCgroup {
    fn create(slice: &Slice, group: &str, instance: &str) -> Result<Self> {
        let rel = slice.rel().join(group).join(instance);
        let v2 = slice.root().join(&rel);
        let mut created_parents = Vec::new();
        for dir in [slice.dir(), slice.dir().join(group)] {
            create_missing(&dir, &mut created_parents)?;
        }
        if let Err(e) = fs::create_dir(&v2) {
            cleanup_dirs(&created_parents);
            return Err(match e.kind() {
                std::io::ErrorKind::AlreadyExists => Error::InstanceExists(v2),
                _ => Error::io(&v2, e),
            });
        }
        let mut worker = Self { v2, v1: None, v1_dirs: Vec::new(), created_parents, keep: false };
        for dir in [slice.dir(), slice.dir().join(group)] {
            enable_controllers(&dir);
        }
        // A hybrid host: memory and cpu live in v1 hierarchies.
        if !is_cgroup2(Path::new("/sys/fs/cgroup")) {
            let v1 = V1::new();
            let mut names = Vec::new();
            for controller in [Controllers::Mem, Controllers::Cpu] {
                if let Some((mount, _)) = v1.get_mount_point(controller.clone()) {
                    let dir = mount.join(&rel);
                    if dir.exists() {
                        return Err(Error::InstanceExists(dir));
                    }
                    // cgroups-rs creates missing parents too; remember them for removal.
                    let mut parent = dir.parent();
                    while let Some(p) = parent.filter(|p| *p != mount && !p.exists()) {
                        worker.created_parents.push(p.to_path_buf());
                        parent = p.parent();
                    }
                    names.push(controller.to_string());
                    worker.v1_dirs.push((controller, dir));
                }
            }
            // Parents first, so cleanup (which walks this backwards) removes children first.
            worker.created_parents.sort_by_key(|p| p.components().count());
            if !names.is_empty() {
                let cgroup = Cgroup::new_with_specified_controllers(Box::new(V1::new()), &rel, Some(names))
                    .map_err(|e| cgroup_err(&rel, e))?;
                worker.v1 = Some(cgroup);
            }
        }
        Ok(worker)
    }

    fn has_v1(&self, controller: &Controllers) -> bool {
        self.v1_dirs.iter().any(|(c, _)| c == controller)
    }

    fn apply_limits(&self, memory_max: Option<u64>, cpu_max: Option<f64>) -> Result<()> {
        let v2_controllers = fs::read_to_string(self.v2.join("cgroup.controllers")).unwrap_or_default();
        let in_v2 = |name: &str| v2_controllers.split_whitespace().any(|c| c == name);
        if let Some(bytes) = memory_max {
            match placement(
                "--memory-max",
                "memory",
                &self.v2,
                in_v2("memory"),
                self.has_v1(&Controllers::Mem),
            )? {
                Placement::V2 => write(&self.v2.join("memory.max"), &bytes.to_string())?,
                Placement::V1 => self.apply_v1(Resources {
                    memory: MemoryResources { memory_hard_limit: Some(bytes as i64), ..Default::default() },
                    ..Default::default()
                })?,
            }
        }
        if let Some(cores) = cpu_max {
            let quota = (cores * CPU_PERIOD_US as f64).round() as u64;
            match placement("--cpu-max", "cpu", &self.v2, in_v2("cpu"), self.has_v1(&Controllers::Cpu))? {
                Placement::V2 => write(&self.v2.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?,
                Placement::V1 => self.apply_v1(Resources {
                    cpu: CpuResources {
                        quota: Some(quota as i64),
                        period: Some(CPU_PERIOD_US),
                        ..Default::default()
                    },
                    ..Default::default()
                })?,
            }
        }
        Ok(())
    }

    fn apply_v1(&self, resources: Resources) -> Result<()> {
        let cgroup = self.v1.as_ref().expect("a v1 placement implies a v1 cgroup");
        cgroup.apply(&resources).map_err(|e| cgroup_err(&self.v2, e))
    }

    /// Starts the command inside every cgroup of the worker, forwards signals to it, and
    /// waits for it.
    fn run(&self, spec: &SpawnSpec, user: Option<&User>) -> Result<i32> {
        let (program, args) = spec.command.split_first().ok_or_else(|| Error::Spawn {
            command: String::new(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "no command given"),
        })?;
        // Opened here, written by the child between fork and exec: it joins before running
        // a single instruction of the command. Writing "0" moves the writer itself.
        let procs: Vec<OwnedFd> = std::iter::once(self.v2.clone())
            .chain(self.v1_dirs.iter().map(|(_, d)| d.clone()))
            .map(|dir| {
                let path = dir.join("cgroup.procs");
                fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map(OwnedFd::from)
                    .map_err(|e| Error::io(&path, e))
            })
            .collect::<Result<_>>()?;
        let fds: Vec<i32> = procs.iter().map(AsRawFd::as_raw_fd).collect();
        let ids = user.map(|u| (u.uid, u.gid, u.groups.clone()));

        let mut cmd = Command::new(program);
        cmd.args(args).envs(spec.env.iter().map(|(k, v)| (k, v)));
        // SAFETY: only async-signal-safe system calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                for &fd in &fds {
                    if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some((uid, gid, groups)) = &ids {
                    if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                        || libc::setgid(*gid) != 0
                        || libc::setuid(*uid) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut signals =
            signal_hook::iterator::Signals::new(FORWARDED).map_err(|e| Error::io("signal handlers", e))?;
        let mut child =
            cmd.spawn().map_err(|source| Error::Spawn { command: spec.command.join(" "), source })?;
        drop(procs);
        log::info!("worker {} started: pid {}", self.v2.display(), child.id());

        let pid = child.id() as i32;
        let handle = signals.handle();
        let forwarder = std::thread::spawn(move || {
            for signal in signals.forever() {
                // SAFETY: plain kill(2) of our own child.
                unsafe { libc::kill(pid, signal) };
            }
        });
        let status = child.wait().map_err(|e| Error::io(format!("wait for pid {pid}"), e));
        handle.close();
        let _ = forwarder.join();
        let status = status?;
        use std::os::unix::process::ExitStatusExt;
        Ok(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
    }
}

impl Drop for WorkerCgroup {
    fn drop(&mut self) {
        if self.keep {
            log::info!("keeping worker cgroup {}", self.v2.display());
            return;
        }
        // Whatever the command left running dies with the worker.
        if fs::write(self.v2.join("cgroup.kill"), "1").is_err() {
            for pid in crate::sources::cgroup::procs(&self.v2).unwrap_or_default() {
                // SAFETY: plain kill(2).
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while populated(&self.v2) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        for dir in std::iter::once(&self.v2).chain(self.v1_dirs.iter().map(|(_, d)| d)) {
            if let Err(e) = fs::remove_dir(dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    log::warn!("could not remove {}: {e}", dir.display());
                }
            }
        }
        cleanup_dirs(&self.created_parents);
    }
}

/// Removes directories this spawn created, deepest first; one still used by another worker
/// stays.
fn cleanup_dirs(created: &[PathBuf]) {
    for dir in created.iter().rev() {
        let _ = fs::remove_dir(dir);
    }
}

fn create_missing(dir: &Path, created: &mut Vec<PathBuf>) -> Result<()> {
    match fs::create_dir(dir) {
        Ok(()) => {
            created.push(dir.to_path_buf());
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let parent = dir.parent().ok_or_else(|| Error::io(dir, e))?;
            create_missing(parent, created)?;
            create_missing(dir, created)
        }
        Err(e) => Err(Error::io(dir, e)),
    }
}

/// Makes the memory and cpu controllers, where the host offers them, available below `dir`.
/// Best effort: a failure shows up as the limit's own clear error.
fn enable_controllers(dir: &Path) {
    let available = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    for controller in ["memory", "cpu"] {
        if available.split_whitespace().any(|c| c == controller) {
            if let Err(e) = fs::write(dir.join("cgroup.subtree_control"), format!("+{controller}")) {
                log::debug!("cannot enable {controller} below {}: {e}", dir.display());
            }
        }
    }
}

fn populated(dir: &Path) -> bool {
    fs::read_to_string(dir.join("cgroup.events")).is_ok_and(|t| t.lines().any(|l| l == "populated 1"))
}

fn write(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value).map_err(|e| Error::io(path, e))
}

fn cgroup_err(path: &Path, e: cgroups_rs::fs::error::Error) -> Error {
    use std::error::Error as _;
    let cause = e.source().map(|c| format!(": {c}")).unwrap_or_default();
    Error::Cgroup { path: path.display().to_string(), message: format!("{e}{cause}") }
}

/// A user to run the command as.
struct User {
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
}

impl User {
    fn lookup(name: &str) -> Result<Self> {
        let unknown = || Error::UnknownUser(name.to_string());
        let cname = CString::new(name).map_err(|_| unknown())?;
        // SAFETY: passwd is plain C data (integers and pointers), valid as all zeroes.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut buf = vec![0u8; 16 * 1024];
        let mut found = std::ptr::null_mut();
        // SAFETY: all pointers are valid for the lengths given.
        let rc = unsafe {
            libc::getpwnam_r(cname.as_ptr(), &mut pwd, buf.as_mut_ptr().cast(), buf.len(), &mut found)
        };
        if rc != 0 || found.is_null() {
            return Err(unknown());
        }
        let (uid, gid) = (pwd.pw_uid, pwd.pw_gid);
        let mut groups = vec![0 as libc::gid_t; 256];
        let mut n = groups.len() as i32;
        // SAFETY: `groups` holds `n` entries.
        if unsafe { libc::getgrouplist(cname.as_ptr(), gid, groups.as_mut_ptr(), &mut n) } < 0 {
            n = 1;
            groups[0] = gid;
        }
        groups.truncate(n.max(0) as usize);
        Ok(Self { uid, gid, groups })
    }
}

/// Parses a CPU limit in cores (`0.5`, `2`), at least 1 ms per 100 ms period.
pub fn parse_cores(s: &str) -> Result<f64, String> {
    let cores: f64 =
        s.trim().parse().map_err(|_| format!("`{s}` is not a number of cores (examples: 0.5, 2)"))?;
    if !(0.01..=65536.0).contains(&cores) {
        return Err(format!("`{s}` is outside 0.01..65536 cores"));
    }
    Ok(cores)
}

/// Parses `KEY=VALUE`.
pub fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !k.contains('\0') && !v.contains('\0') => Ok((k.into(), v.into())),
        _ => Err(format!("`{s}` is not KEY=VALUE")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cores_and_env() {
        assert_eq!(parse_cores("1.5"), Ok(1.5));
        assert!(parse_cores("0").is_err() && parse_cores("x").is_err() && parse_cores("1e9").is_err());
        assert_eq!(parse_env("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert!(parse_env("=x").is_err() && parse_env("novalue").is_err());
    }

    #[test]
    fn a_limit_without_a_controller_is_a_clear_error() {
        let dir = Path::new("/sys/fs/cgroup/rbee.slice/llm/8080");
        assert_eq!(placement("--memory-max", "memory", dir, true, true).unwrap(), Placement::V2);
        assert_eq!(placement("--memory-max", "memory", dir, false, true).unwrap(), Placement::V1);
        let e = placement("--memory-max", "memory", dir, false, false).unwrap_err().to_string();
        assert!(
            e.starts_with("--memory-max cannot be applied: the memory controller is not enabled for"),
            "{e}"
        );
        assert!(
            e.contains("/sys/fs/cgroup/rbee.slice/llm/8080") && e.contains("no cgroup v1 memory hierarchy"),
            "{e}"
        );
    }
}
