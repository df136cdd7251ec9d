//! A worker's memory, from the memory cgroup that holds exactly its processes (v2 files on
//! unified hosts, v1 files on hybrid ones), else summed over its processes from `/proc`.
//!
//! The files are parsed here rather than through cgroups-rs, whose readers turn a missing or
//! unreadable file into 0: a cgroup that vanished mid-read would be reported as using no
//! memory. Here it is an error, and the figure is left out.
use std::{
    collections::{hash_map::Entry, HashMap, HashSet},
    path::{Path, PathBuf},
};

use crate::{
    error::{Error, Result},
    sources::cgroup,
};

/// Where a reading came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    CgroupV2,
    CgroupV1,
    /// Summed over the worker's processes: their memory cgroup is shared with others.
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

/// The processes of each v1 memory cgroup looked at during one sample: when workers share
/// one, its members are listed once, not once per worker.
#[derive(Default)]
pub struct V1Members(HashMap<PathBuf, HashSet<u32>>);

/// Reads a worker's memory. `dir` is its v2 cgroup, `procs` every process in it and below,
/// `v1_mount` the v1 memory hierarchy's mount point on a hybrid host.
pub fn read(
    dir: &Path,
    procs: &[u32],
    main: Option<u32>,
    v1_mount: Option<&Path>,
    members: &mut V1Members,
) -> Result<MemoryReading> {
    if dir.join("memory.current").exists() {
        return read_v2(dir);
    }
    if let (Some(mount), Some(main)) = (v1_mount, main) {
        let v1 = v1_memory_dir(mount, main)?;
        let inside = match members.0.entry(v1.clone()) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(cgroup::procs(&v1)?.into_iter().collect()),
        };
        let distinct: HashSet<u32> = procs.iter().copied().collect();
        if *inside == distinct {
            return read_v1(&v1);
        }
    }
    read_procfs(procs)
}

/// The v1 memory cgroup of process `pid`.
fn v1_memory_dir(mount: &Path, pid: u32) -> Result<PathBuf> {
    let path = format!("/proc/{pid}/cgroup");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
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

fn read_v2(dir: &Path) -> Result<MemoryReading> {
    let stat = read_file(&dir.join("memory.stat"))?;
    Ok(MemoryReading {
        origin: Origin::CgroupV2,
        current: read_u64(&dir.join("memory.current"))?,
        anon: Some(field(&stat, "anon").ok_or_else(|| invalid(dir.join("memory.stat"), "no anon"))?),
        file: Some(field(&stat, "file").ok_or_else(|| invalid(dir.join("memory.stat"), "no file"))?),
        // memory.peak appeared in Linux 5.19.
        peak: read_u64(&dir.join("memory.peak")).ok(),
        limit: match read_file(&dir.join("memory.max"))?.trim() {
            "max" => None,
            v => Some(v.parse().map_err(|_| invalid(dir.join("memory.max"), "not a number"))?),
        },
        oom_kills: field(&read_file(&dir.join("memory.events"))?, "oom_kill"),
    })
}

/// Values at or above this in `memory.limit_in_bytes` mean "no limit" (PAGE_COUNTER_MAX
/// rounded to pages).
const V1_UNLIMITED: u64 = 1 << 62;

fn read_v1(dir: &Path) -> Result<MemoryReading> {
    let stat = read_file(&dir.join("memory.stat"))?;
    let limit = read_u64(&dir.join("memory.limit_in_bytes"))?;
    Ok(MemoryReading {
        origin: Origin::CgroupV1,
        current: read_u64(&dir.join("memory.usage_in_bytes"))?,
        // The total_ fields include the cgroup's descendants, as usage_in_bytes does.
        anon: field(&stat, "total_rss"),
        file: field(&stat, "total_cache"),
        peak: Some(read_u64(&dir.join("memory.max_usage_in_bytes"))?),
        limit: (limit < V1_UNLIMITED).then_some(limit),
        oom_kills: field(&read_file(&dir.join("memory.oom_control"))?, "oom_kill"),
    })
}

/// Sums `VmRSS` (`RssAnon`, `RssFile` + `RssShmem`) of the processes; one that exited
/// meanwhile holds no memory any more and is skipped.
fn read_procfs(procs: &[u32]) -> Result<MemoryReading> {
    let mut total = MemoryReading {
        origin: Origin::Procfs,
        current: 0,
        anon: Some(0),
        file: Some(0),
        peak: None,
        limit: None,
        oom_kills: None,
    };
    for pid in procs {
        let path = format!("/proc/{pid}/status");
        let status = match std::fs::read_to_string(&path) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(&path, e)),
        };
        let kb = |name: &str| status_kb(&status, name);
        // Kernel threads have no VmRSS line; they hold no user memory.
        total.current += kb("VmRSS:").unwrap_or(0);
        total.anon = total.anon.zip(kb("RssAnon:")).map(|(a, b)| a + b);
        total.file = total.file.zip(kb("RssFile:")).zip(kb("RssShmem:")).map(|((a, b), c)| a + b + c);
    }
    Ok(total)
}

/// A `Name:  123 kB` line of `/proc/<pid>/status`, in bytes.
fn status_kb(status: &str, name: &str) -> Option<u64> {
    let v = status.lines().find_map(|l| l.strip_prefix(name))?;
    v.trim().strip_suffix("kB")?.trim().parse::<u64>().ok().map(|kb| kb * 1024)
}

/// A `name value` line of a flat-keyed cgroup file.
fn field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == name).then(|| v.trim().parse().ok())?
    })
}

fn read_file(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

fn read_u64(path: &Path) -> Result<u64> {
    read_file(path)?.trim().parse().map_err(|_| invalid(path, "not a number"))
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
    fn status_lines() {
        let status = "Name:\tx\nVmRSS:\t    2048 kB\nRssAnon:\t  1024 kB\nBad:\t12\n";
        assert_eq!(status_kb(status, "VmRSS:"), Some(2 << 20));
        assert_eq!(status_kb(status, "RssAnon:"), Some(1 << 20));
        assert_eq!(status_kb(status, "Bad:"), None);
        assert_eq!(status_kb(status, "RssFile:"), None);
    }

    #[test]
    fn own_process_from_procfs() {
        let m = read_procfs(&[std::process::id(), u32::MAX]).unwrap();
        assert_eq!(m.origin, Origin::Procfs);
        assert!(m.current > 0 && m.anon.unwrap() > 0, "{m:?}");
        assert!(m.anon.unwrap() + m.file.unwrap() <= m.current + 4096, "{m:?}");
    }
}
