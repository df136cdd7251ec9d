//! The cgroup2 tree: where it is mounted, the watched slice, and the workers in it.
use std::{
    os::unix::fs::{DirEntryExt, MetadataExt},
    path::{Path, PathBuf},
};

use monitor_common::SliceFilter;

use crate::error::{Error, Result};

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Longest group or instance name accepted (bytes).
pub const MAX_NAME_LEN: usize = 64;

/// Whether `path` is on a cgroup2 file system.
pub fn is_cgroup2(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs is plain C data, valid as all zeroes.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out pointer.
    (unsafe { libc::statfs(c.as_ptr(), &mut fs) } == 0) && fs.f_type as i64 == CGROUP2_SUPER_MAGIC
}

/// The cgroup2 mount: `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on hybrid ones.
pub fn detect_root() -> Result<PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| is_cgroup2(p))
        .ok_or(Error::NoCgroup2)
}

/// A group or instance name that is safe to put in a path and in a heartbeat.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != "."
        && name != ".."
        && !name.contains(['/', '\0'])
        && !name.chars().any(char::is_control)
}

/// The watched slice: `<root>/<rel>`, e.g. `/sys/fs/cgroup/unified/rbee.slice`.
#[derive(Clone, Debug)]
pub struct Slice {
    root: PathBuf,
    rel: PathBuf,
    level: u32,
}

/// A worker cgroup, `<slice>/<group>/<instance>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerCgroup {
    /// v2 cgroup id: the directory's inode number, what `bpf_get_current_cgroup_id()` returns.
    pub id: u64,
    pub group: String,
    pub instance: String,
    pub dir: PathBuf,
    /// Path relative to the cgroup2 root, as `/proc/<pid>/cgroup` shows it (leading `/`).
    pub path: String,
}

impl Slice {
    /// `rel` is the slice's path below the cgroup2 mount `root`; it may be nested.
    pub fn new(root: impl Into<PathBuf>, rel: &str) -> Result<Self> {
        let root = root.into();
        if !is_cgroup2(&root) {
            return Err(Error::NotCgroup2 { path: root });
        }
        let parts: Vec<&str> = rel.split('/').collect();
        if !parts.iter().all(|p| valid_name(p)) {
            return Err(Error::BadSlice(rel.to_string()));
        }
        Ok(Self { level: parts.len() as u32, root, rel: PathBuf::from(rel) })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The slice's path below the cgroup2 root.
    pub fn rel(&self) -> &Path {
        &self.rel
    }

    pub fn dir(&self) -> PathBuf {
        self.root.join(&self.rel)
    }

    /// Depth below the cgroup2 root; equals the kernel's `cgroup->level` when this process
    /// sees the host's cgroup namespace, which the daemon requires.
    pub fn level(&self) -> u32 {
        self.level
    }

    /// What the probes filter on; id 0 while the slice does not exist.
    pub fn filter(&self) -> SliceFilter {
        let id = std::fs::metadata(self.dir()).map(|m| m.ino()).unwrap_or(0);
        SliceFilter { id }
    }

    /// The workers now in the slice. A missing slice has none; names that fail
    /// `valid_name` are skipped with a warning.
    pub fn workers(&self) -> Result<Vec<WorkerCgroup>> {
        let dir = self.dir();
        let mut out = Vec::new();
        for (group, group_dir, _) in subdirs(&dir)? {
            for (instance, instance_dir, id) in subdirs(&group_dir)? {
                let path = format!("/{}/{group}/{instance}", self.rel.display());
                out.push(WorkerCgroup { id, group: group.clone(), instance, dir: instance_dir, path });
            }
        }
        out.sort_unstable_by(|a, b| (&a.group, &a.instance).cmp(&(&b.group, &b.instance)));
        Ok(out)
    }
}

/// A cgroup directory's link count is 2 + its child cgroups (kernfs keeps it so): a stat
/// spares listing the ~30 interface files of a cgroup without children.
pub fn has_children(dir: &Path) -> bool {
    std::fs::metadata(dir).is_ok_and(|m| nlink_children(&m))
}

fn nlink_children(meta: &std::fs::Metadata) -> bool {
    meta.nlink() > 2
}

/// Child cgroups of `dir` with valid names, each with its inode number (the cgroup id), which
/// the directory listing carries: no stat per worker each sample. A directory that vanished
/// has none.
fn subdirs(dir: &Path) -> Result<Vec<(String, PathBuf, u64)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        // file_type() does not follow symlinks: a link planted in the slice is not a worker.
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        match entry.file_name().into_string() {
            Ok(name) if valid_name(&name) => out.push((name, entry.path(), entry.ino())),
            name => log::warn!("skipping cgroup with an invalid name {:?} in {}", name, dir.display()),
        }
    }
    Ok(out)
}

/// CPU time the kernel charged to the cgroup at `dir` and below: `cpu.stat` `usage_usec`,
/// in ns. Present on every v2 cgroup, with or without the cpu controller.
pub fn cpu_usage_ns(dir: &Path) -> Result<u64> {
    let path = dir.join("cpu.stat");
    let text = super::read_small(path.as_ref()).map_err(|e| Error::io(&path, e))?;
    text.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|usec| usec * 1000)
        .ok_or_else(|| {
            Error::io(&path, std::io::Error::new(std::io::ErrorKind::InvalidData, "no usage_usec"))
        })
}

/// Processes in the cgroup at `dir` and every cgroup below it.
pub fn procs(dir: &Path) -> Result<Vec<u32>> {
    procs_below(dir, has_children(dir))
}

/// The processes of a worker, in its cgroup and below.
pub fn worker_procs(worker: &WorkerCgroup, files: &mut super::KeptFiles) -> Result<Vec<u32>> {
    procs_kept(&worker.dir, has_children(&worker.dir), files)
}

/// Processes in the cgroup at `dir` and, when `nested`, below it; its own `cgroup.procs`
/// through `files`, which keeps it open for the next sample.
pub fn procs_kept(dir: &Path, nested: bool, files: &mut super::KeptFiles) -> Result<Vec<u32>> {
    let file = dir.join("cgroup.procs");
    let text = files.read(&file).map_err(|e| Error::io(&file, e))?;
    let mut out = pids(&text);
    if nested {
        for (child, nested) in subdirs_any(dir).map_err(|e| Error::io(dir, e))? {
            match procs_below(&child, nested) {
                Ok(p) => out.extend(p),
                // Removed since the listing: it holds no process.
                Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(out)
}

fn pids(text: &str) -> Vec<u32> {
    text.lines().filter_map(|l| l.trim().parse::<u32>().ok()).collect()
}

fn procs_below(dir: &Path, nested: bool) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), nested)];
    while let Some((d, nested)) = stack.pop() {
        let file = d.join("cgroup.procs");
        let text = super::read_small(&file).map_err(|e| Error::io(&file, e))?;
        out.extend(pids(&text));
        if !nested {
            continue;
        }
        if let Ok(children) = subdirs_any(&d) {
            stack.extend(children);
        }
    }
    Ok(out)
}

/// Every child directory of `dir`, whatever its name, and whether it has children.
fn subdirs_any(dir: &Path) -> std::io::Result<Vec<(PathBuf, bool)>> {
    Ok(std::fs::read_dir(dir)?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| Some((e.path(), nlink_children(&e.metadata().ok()?))))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["llm", "8080", "a.b-c_d", &"x".repeat(MAX_NAME_LEN)] {
            assert!(valid_name(good), "{good}");
        }
        for bad in ["", ".", "..", "a/b", "a\0b", "tab\t", &"x".repeat(MAX_NAME_LEN + 1)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn slice_paths() {
        let Some(root) = detect_root().ok() else {
            eprintln!("no cgroup2 mount here; slice path checks need one to build a Slice");
            return;
        };
        assert_eq!(Slice::new(&root, "rbee.slice").unwrap().level(), 1);
        let nested = Slice::new(&root, "some/parent/rbee.slice").unwrap();
        assert_eq!(nested.level(), 3);
        assert_eq!(nested.dir(), root.join("some/parent/rbee.slice"));
        for bad in ["", "/abs", "../up", "a/../b", "a/./b", "a//b", "a/", "."] {
            assert!(Slice::new(&root, bad).is_err(), "{bad:?}");
        }
        assert!(Slice::new("/proc", "rbee.slice").is_err());
    }
}
