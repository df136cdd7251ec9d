//! A worker's memory, from the memory cgroup that holds exactly its processes (v2 files on
//! unified hosts, v1 files on hybrid ones), else summed over its processes: by the task
//! iterator in the kernel, or from `/proc` where it cannot.
//!
//! The files are parsed here rather than through cgroups-rs, whose readers turn a missing or
//! unreadable file into 0: a cgroup that vanished mid-read would be reported as using no
//! memory. Here it is an error, and the figure is left out.
use std::{
    collections::hash_map::Entry,
    ffi::OsString,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use monitor_common::{CgroupMemory, ProcessMemory};
use rustc_hash::{FxHashMap, FxHashSet};

use crate::{
    error::{Error, Result},
    sources::{cgroup, KeptFiles},
};

/// Where a reading came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    CgroupV2,
    CgroupV1,
    /// Summed over the worker's processes (their memory cgroup is shared with others), as
    /// the task iterator read their counters in the kernel.
    Ebpf,
    /// The same sum from `/proc/<pid>/statm`, where the iterator cannot read them.
    Procfs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryReading {
    pub origin: Origin,
    /// Bytes charged to the cgroup (page cache included), or the processes' summed RSS.
    pub current: u64,
    pub anon: Option<u64>,
    pub file: Option<u64>,
    /// The cgroup's high-water mark; not known from `/proc`.
    pub peak: Option<u64>,
    /// `None`: no limit (or not known from `/proc`).
    pub limit: Option<u64>,
    pub oom_kills: Option<u64>,
}

/// How often the v1 memory cgroup of each main process is looked up again; between lookups
/// it is taken from the last one (a worker's cgroups rarely change).
const V1_DIR_REFRESH: u64 = 60;

/// Reads workers' memory, keeping what stays the same from one sample to the next.
pub struct MemorySource {
    /// The v1 memory hierarchy's mount point, on a hybrid host (there the v2 tree has no
    /// memory controller).
    v1_mount: Option<PathBuf>,
    /// Main process → its v1 memory cgroup, as of the last lookup, whether that had child
    /// cgroups then (a child made since holds processes missing from the listing, so the
    /// figure is summed over the processes until the next lookup: never a wrong one), and
    /// its id (inode number).
    v1_dirs: FxHashMap<u32, V1Dir>,
    /// The processes of each v1 memory cgroup looked at during this sample.
    v1_members: FxHashMap<PathBuf, FxHashSet<u32>>,
    /// v1 memory cgroups that the main processes of two or more workers are in: such a
    /// cgroup holds more than any one worker, so its members need no listing (on a host
    /// whose workers all share one, that listing would be every worker's processes, sorted,
    /// once a sample).
    /// (Keyed by the path's bytes: a `Path` hashes component by component.)
    v1_shared: FxHashSet<OsString>,
    /// Whether `v1_dirs` changed since `v1_shared` was worked out.
    v1_dirs_changed: bool,
    samples: u64,
    /// The memory files of the workers and their processes, kept open.
    files: KeptFiles,
    /// Whether v2 `memory.events` counts only the cgroup's own events (the
    /// `memory_localevents` mount option): the kernel's hierarchical count is not its figure.
    local_events: bool,
}

/// A main process's v1 memory cgroup, as of the last lookup.
struct V1Dir {
    dir: PathBuf,
    nested: bool,
    id: u64,
}

/// What the task iterator read of a worker's memory.
#[derive(Clone, Copy, Debug, Default)]
pub struct FromKernel {
    /// Its processes' resident memory, summed.
    pub processes: Option<ProcessMemory>,
    /// The memory cgroup its main process is charged to, with that cgroup's counters: when
    /// that is the cgroup whose files would be read, only `memory.stat` is.
    pub main_cgroup: Option<CgroupMemory>,
}

impl MemorySource {
    pub fn new(v1_mount: Option<PathBuf>) -> Self {
        Self {
            v1_mount,
            v1_dirs: FxHashMap::default(),
            v1_members: FxHashMap::default(),
            v1_shared: FxHashSet::default(),
            v1_dirs_changed: false,
            samples: 0,
            files: KeptFiles::default(),
            local_events: cgroup2_local_events(),
        }
    }

    /// Starts a sample: what was listed for the last one is stale.
    pub fn begin_sample(&mut self) {
        self.v1_members.clear();
        self.files.sweep();
        self.samples += 1;
        if self.samples.is_multiple_of(V1_DIR_REFRESH) {
            self.v1_dirs.clear();
            self.v1_dirs_changed = true;
        }
        if !std::mem::take(&mut self.v1_dirs_changed) {
            return;
        }
        let mut seen = FxHashSet::default();
        self.v1_shared = self
            .v1_dirs
            .values()
            .map(|d| d.dir.as_os_str())
            .filter(|d| !seen.insert(*d))
            .map(Into::into)
            .collect();
    }

    /// Forgets the main processes not in `live`.
    pub fn retain_mains(&mut self, live: impl Fn(u32) -> bool) {
        let before = self.v1_dirs.len();
        self.v1_dirs.retain(|pid, _| live(*pid));
        self.v1_dirs_changed |= self.v1_dirs.len() != before;
    }

    /// Reads a worker's memory. `dir` is its v2 cgroup and `id` that cgroup's id, `procs`
    /// every process in it and below, and `kernel` what the task iterator read (nothing
    /// without it). A v1 memory cgroup found stale (the main process moved) gives no wrong
    /// figure: its members no longer equal `procs`, so the processes are summed instead
    /// until the next lookup.
    pub fn read(
        &mut self,
        (dir, id): (&Path, u64),
        procs: &[u32],
        main: Option<u32>,
        kernel: FromKernel,
    ) -> Result<MemoryReading> {
        let of_processes = |files: &mut KeptFiles| match kernel.processes {
            Some(m) => Ok(from_kernel(m)),
            None => read_procfs(files, procs),
        };
        let Some(mount) = &self.v1_mount else {
            if let Some(c) = kernel.main_cgroup.filter(|c| c.id == id && !self.local_events) {
                return read_v2_counted(&mut self.files, dir, c);
            }
            // Without the memory controller enabled on it, a v2 cgroup has no memory files.
            return match read_v2(&mut self.files, dir) {
                Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                    of_processes(&mut self.files)
                }
                reading => reading,
            };
        };
        if let Some(main) = main {
            let v1 = match self.v1_dirs.entry(main) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => {
                    let dir = v1_memory_dir(mount, main)?;
                    let nested = cgroup::has_children(&dir);
                    let id = std::fs::metadata(&dir).map_err(|e| Error::io(&dir, e))?.ino();
                    self.v1_dirs_changed = true;
                    e.insert(V1Dir { dir, nested, id })
                }
            };
            if self.v1_shared.contains(v1.dir.as_os_str()) {
                return of_processes(&mut self.files);
            }
            let inside = match self.v1_members.entry(v1.dir.clone()) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => {
                    e.insert(cgroup::procs_kept(&v1.dir, v1.nested, &mut self.files)?.into_iter().collect())
                }
            };
            if inside.len() == procs.len() && procs.iter().all(|p| inside.contains(p)) {
                return match kernel.main_cgroup.filter(|c| c.id == v1.id) {
                    Some(c) => read_v1_counted(&mut self.files, &v1.dir, c),
                    None => read_v1(&mut self.files, &v1.dir),
                };
            }
        }
        of_processes(&mut self.files)
    }
}

/// The v1 memory cgroup of process `pid`.
fn v1_memory_dir(mount: &Path, pid: u32) -> Result<PathBuf> {
    let path = format!("/proc/{pid}/cgroup");
    let text = super::read_small(path.as_ref()).map_err(|e| Error::io(&path, e))?;
    let rel = text
        .lines()
        .find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, rel) = (parts.next()?, parts.next()?, parts.next()?);
            controllers.split(',').any(|c| c == "memory").then_some(rel)
        })
        .ok_or_else(|| invalid(&path, "no memory controller line"))?;
    Ok(mount.join(rel.trim_start_matches('/')))
}

fn read_v2(files: &mut KeptFiles, dir: &Path) -> Result<MemoryReading> {
    let (anon, file) = v2_stat(files, dir)?;
    let mut read_file = |name: &str| read_file(files, &dir.join(name));
    Ok(MemoryReading {
        origin: Origin::CgroupV2,
        current: number(&dir.join("memory.current"), &read_file("memory.current")?)?,
        anon: Some(anon),
        file: Some(file),
        // memory.peak appeared in Linux 5.19.
        peak: read_file("memory.peak").ok().and_then(|t| number(&dir.join("memory.peak"), &t).ok()),
        limit: match read_file("memory.max")?.trim() {
            "max" => None,
            v => Some(v.parse().map_err(|_| invalid(dir.join("memory.max"), "not a number"))?),
        },
        oom_kills: field(&read_file("memory.events")?, "oom_kill"),
    })
}

/// `memory.current`, `.peak`, `.max` and `memory.events` `oom_kill` from the counters the
/// task iterator read (the values those files print), and `memory.stat` read.
fn read_v2_counted(files: &mut KeptFiles, dir: &Path, c: CgroupMemory) -> Result<MemoryReading> {
    let page = page_size();
    let (anon, file) = v2_stat(files, dir)?;
    Ok(MemoryReading {
        origin: Origin::CgroupV2,
        current: c.usage_pages * page,
        anon: Some(anon),
        file: Some(file),
        peak: Some(c.watermark_pages * page),
        // `memory.max` prints "max" for PAGE_COUNTER_MAX, `LONG_MAX / PAGE_SIZE`.
        limit: (c.max_pages != i64::MAX as u64 / page).then_some(c.max_pages * page),
        oom_kills: Some(c.oom_kills),
    })
}

/// As `read_v2_counted`, for a v1 memory cgroup: `memory.usage_in_bytes`,
/// `.max_usage_in_bytes`, `.limit_in_bytes` and `memory.oom_control` `oom_kill`.
fn read_v1_counted(files: &mut KeptFiles, dir: &Path, c: CgroupMemory) -> Result<MemoryReading> {
    let page = page_size();
    let (anon, file) = v1_stat(files, dir)?;
    let limit = c.max_pages * page;
    Ok(MemoryReading {
        origin: Origin::CgroupV1,
        current: c.usage_pages * page,
        anon,
        file,
        peak: Some(c.watermark_pages * page),
        limit: (limit < V1_UNLIMITED).then_some(limit),
        oom_kills: Some(c.oom_kills),
    })
}

/// The anonymous and file bytes of a v2 cgroup's `memory.stat`.
fn v2_stat(files: &mut KeptFiles, dir: &Path) -> Result<(u64, u64)> {
    let path = dir.join("memory.stat");
    let stat = read_file(files, &path)?;
    let get = |name: &str| field(&stat, name).ok_or_else(|| invalid(&path, &format!("no {name}")));
    Ok((get("anon")?, get("file")?))
}

/// The anonymous and file bytes of a v1 cgroup's `memory.stat`: its `total_` fields, which
/// include the cgroup's descendants, as `usage_in_bytes` does.
fn v1_stat(files: &mut KeptFiles, dir: &Path) -> Result<(Option<u64>, Option<u64>)> {
    let stat = read_file(files, &dir.join("memory.stat"))?;
    Ok((field(&stat, "total_rss"), field(&stat, "total_cache")))
}

/// Whether the cgroup2 hierarchy is mounted with `memory_localevents`.
fn cgroup2_local_events() -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .is_ok_and(|m| m.lines().any(|l| l.contains(" - cgroup2 ") && l.contains("memory_localevents")))
}

/// Values at or above this in `memory.limit_in_bytes` mean "no limit" (PAGE_COUNTER_MAX
/// rounded to pages).
const V1_UNLIMITED: u64 = 1 << 62;

fn read_v1(files: &mut KeptFiles, dir: &Path) -> Result<MemoryReading> {
    let mut read_u64 = |name: &str| {
        let path = dir.join(name);
        number(&path, &read_file(files, &path)?)
    };
    let limit = read_u64("memory.limit_in_bytes")?;
    let current = read_u64("memory.usage_in_bytes")?;
    let peak = read_u64("memory.max_usage_in_bytes")?;
    let (anon, file) = v1_stat(files, dir)?;
    Ok(MemoryReading {
        origin: Origin::CgroupV1,
        current,
        anon,
        file,
        peak: Some(peak),
        limit: (limit < V1_UNLIMITED).then_some(limit),
        oom_kills: field(&read_file(files, &dir.join("memory.oom_control"))?, "oom_kill"),
    })
}

/// Sums the resident memory of the processes from `/proc/<pid>/statm` (far cheaper for the
/// kernel to produce than `status`): resident pages, of which `shared` are file-backed or
/// shmem (`RssFile` + `RssShmem`) and the rest anonymous. A process that exited meanwhile
/// holds no memory any more and is skipped.
fn read_procfs(files: &mut KeptFiles, procs: &[u32]) -> Result<MemoryReading> {
    let page = page_size();
    let (mut resident, mut shared) = (0, 0);
    for pid in procs {
        let path = PathBuf::from(format!("/proc/{pid}/statm"));
        let statm = match files.read(&path) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(&path, e)),
        };
        let (r, s) = statm_pages(&statm).ok_or_else(|| invalid(&path, "not size resident shared ..."))?;
        resident += r;
        shared += s;
    }
    Ok(MemoryReading {
        origin: Origin::Procfs,
        current: resident * page,
        anon: Some(resident.saturating_sub(shared) * page),
        file: Some(shared * page),
        peak: None,
        limit: None,
        oom_kills: None,
    })
}

/// The processes' memory as the task iterator summed it: `statm`'s figures, read in the
/// kernel during the pass instead of one file per process.
fn from_kernel(m: ProcessMemory) -> MemoryReading {
    let page = page_size();
    let shared = m.file_pages + m.shmem_pages;
    MemoryReading {
        origin: Origin::Ebpf,
        current: (shared + m.anon_pages) * page,
        anon: Some(m.anon_pages * page),
        file: Some(shared * page),
        peak: None,
        limit: None,
        oom_kills: None,
    }
}

/// Resident and shared pages: the second and third fields of `statm`.
fn statm_pages(statm: &str) -> Option<(u64, u64)> {
    let mut fields = statm.split_whitespace().skip(1).map(|v| v.parse::<u64>().ok());
    Some((fields.next()??, fields.next()??))
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as u64 }
}

/// A `name value` line of a flat-keyed cgroup file.
fn field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == name).then(|| v.trim().parse().ok())?
    })
}

fn read_file(files: &mut KeptFiles, path: &Path) -> Result<String> {
    files.read(path).map_err(|e| Error::io(path, e))
}

/// A file holding one number.
fn number(path: &Path, text: &str) -> Result<u64> {
    text.trim().parse().map_err(|_| invalid(path, "not a number"))
}

fn invalid(path: impl AsRef<Path>, what: &str) -> Error {
    Error::io(path.as_ref(), std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_keyed_fields() {
        let stat = "anon 4096\nfile 8192\nanon_thp 0\n";
        assert_eq!(
            (field(stat, "anon"), field(stat, "file"), field(stat, "anon_thp")),
            (Some(4096), Some(8192), Some(0))
        );
        assert_eq!(field(stat, "an"), None, "whole keys only");
        assert_eq!(field("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n", "oom_kill"), Some(3));
        assert_eq!(field("oom_kill lots\n", "oom_kill"), None);
    }

    #[test]
    fn statm_fields() {
        assert_eq!(statm_pages("765 438 410 5 0 123 0\n"), Some((438, 410)));
        assert_eq!(statm_pages("765 x 410"), None);
        assert_eq!(statm_pages("765"), None);
    }

    #[test]
    fn own_process_from_procfs() {
        let m = read_procfs(&mut KeptFiles::default(), &[std::process::id(), u32::MAX]).unwrap();
        assert_eq!(m.origin, Origin::Procfs);
        assert!(m.current > 0 && m.anon.unwrap() > 0, "{m:?}");
        assert!(m.anon.unwrap() + m.file.unwrap() <= m.current + 4096, "{m:?}");
    }

    /// A cgroup file that does not hold what it should is an error naming it: the figure is
    /// left out, never read as 0.
    #[test]
    fn malformed_cgroup_files_are_errors() {
        let dir = std::env::temp_dir().join(format!("hm-memory-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("memory.stat"), "anon 1\nfile 2\n").unwrap();
        std::fs::write(dir.join("memory.max"), "max\n").unwrap();
        std::fs::write(dir.join("memory.events"), "oom_kill 0\n").unwrap();
        for (file, text) in [("memory.current", "lots\n"), ("memory.current", "")] {
            std::fs::write(dir.join(file), text).unwrap();
            let e = MemorySource::new(None)
                .read((&dir, 0), &[], None, FromKernel::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains("memory.current"), "{e}");
        }
        std::fs::write(dir.join("memory.current"), "4096\n").unwrap();
        std::fs::write(dir.join("memory.stat"), "file 2\n").unwrap();
        let e = MemorySource::new(None)
            .read((&dir, 0), &[], None, FromKernel::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("memory.stat") && e.contains("anon"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
