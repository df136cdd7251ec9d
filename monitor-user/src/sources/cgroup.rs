//! The cgroup2 tree: where it is mounted, the watched slice, and the workers in it.
use std::{
    os::unix::fs::{DirEntryExt, MetadataExt},
    path::{Path, PathBuf},
    sync::Arc,
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
    pub group: Arc<str>,
    pub instance: Arc<str>,
    pub dir: PathBuf,
    /// Path relative to the cgroup2 root, as `/proc/<pid>/cgroup` shows it (leading `/`).
    pub path: Arc<str>,
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
        let mut out = Vec::new();
        for (group, group_dir, _) in subdirs(&self.dir())? {
            out.extend(self.group_workers(&group, &group_dir)?);
        }
        Ok(out)
    }

    /// The workers of one group, sorted by instance.
    fn group_workers(&self, group: &str, group_dir: &Path) -> Result<Vec<WorkerCgroup>> {
        let name: Arc<str> = group.into();
        let mut out: Vec<WorkerCgroup> = subdirs(group_dir)?
            .into_iter()
            .map(|(instance, dir, id)| WorkerCgroup {
                id,
                path: format!("/{}/{group}/{instance}", self.rel.display()).into(),
                group: Arc::clone(&name),
                instance: instance.into(),
                dir,
            })
            .collect();
        out.sort_unstable_by(|a, b| a.instance.cmp(&b.instance));
        Ok(out)
    }
}

/// The slice's workers, listed again only where the tree changed. Creating, removing or
/// renaming a cgroup directory goes through the VFS, which tells inotify; so the slice and
/// each group directory are watched, and a directory is listed only after an event in it
/// (or a lost event: then all of them). Listing a thousand workers every sample cost more
/// than a tenth of the daemon's time. Without inotify the slice is listed every sample.
pub struct WorkerList {
    inotify: Option<inotify::Inotify>,
    slice_watch: Option<inotify::WatchDescriptor>,
    /// Each group's directory watch, and its workers as last listed.
    groups: std::collections::BTreeMap<String, (inotify::WatchDescriptor, Vec<Arc<WorkerCgroup>>)>,
    /// The group directories must be listed again: all of them, or those named.
    stale_all: bool,
    stale: std::collections::HashSet<String>,
}

const WATCHED: inotify::WatchMask = inotify::WatchMask::CREATE
    .union(inotify::WatchMask::DELETE)
    .union(inotify::WatchMask::MOVED_FROM)
    .union(inotify::WatchMask::MOVED_TO)
    .union(inotify::WatchMask::DELETE_SELF)
    .union(inotify::WatchMask::MOVE_SELF)
    .union(inotify::WatchMask::ONLYDIR);

impl Default for WorkerList {
    fn default() -> Self {
        let inotify = inotify::Inotify::init()
            .map_err(|e| log::info!("no inotify ({e}): the slice is listed every sample"))
            .ok();
        Self {
            inotify,
            slice_watch: None,
            groups: Default::default(),
            stale_all: true,
            stale: Default::default(),
        }
    }
}

impl WorkerList {
    /// The workers now in `slice`, sorted by group and instance.
    pub fn current(&mut self, slice: &Slice) -> Result<Vec<Arc<WorkerCgroup>>> {
        if self.inotify.is_none() {
            return Ok(slice.workers()?.into_iter().map(Arc::new).collect());
        }
        self.take_events();
        if self.slice_watch.is_none() {
            self.stale_all = true;
        }
        if self.stale_all {
            self.relist_slice(slice)?;
        }
        for group in std::mem::take(&mut self.stale) {
            if let Some((_, workers)) = self.groups.get_mut(&group) {
                *workers = slice
                    .group_workers(&group, &slice.dir().join(&group))?
                    .into_iter()
                    .map(Arc::new)
                    .collect();
            }
        }
        Ok(self.groups.values().flat_map(|(_, w)| w.iter().cloned()).collect())
    }

    /// Reads the queued events and marks what they touched stale.
    fn take_events(&mut self) {
        let Some(inotify) = &mut self.inotify else { return };
        let mut buffer = [0u8; 4096];
        loop {
            let events = match inotify.read_events(&mut buffer) {
                Ok(events) => events,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("reading inotify events: {e}; listing the slice again");
                    self.stale_all = true;
                    return;
                }
            };
            for event in events {
                if event.mask.contains(inotify::EventMask::Q_OVERFLOW)
                    || Some(&event.wd) == self.slice_watch.as_ref()
                {
                    // The slice's own directory changed (a group came or went, or the
                    // slice itself), or events were lost.
                    self.stale_all = true;
                    if event.mask.intersects(
                        inotify::EventMask::IGNORED
                            | inotify::EventMask::DELETE_SELF
                            | inotify::EventMask::MOVE_SELF,
                    ) {
                        self.slice_watch = None;
                    }
                } else if let Some((group, _)) = self.groups.iter().find(|(_, (wd, _))| *wd == event.wd) {
                    if event.mask.intersects(
                        inotify::EventMask::IGNORED
                            | inotify::EventMask::DELETE_SELF
                            | inotify::EventMask::MOVE_SELF,
                    ) {
                        self.stale_all = true;
                    } else {
                        self.stale.insert(group.clone());
                    }
                }
            }
        }
    }

    /// Lists the slice's groups, watching each before it is listed so that no change after
    /// its listing goes unseen.
    fn relist_slice(&mut self, slice: &Slice) -> Result<()> {
        let Some(inotify) = &mut self.inotify else { return Ok(()) };
        let dir = slice.dir();
        self.slice_watch = match inotify.watches().add(&dir, WATCHED) {
            Ok(wd) => Some(wd),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io(&dir, e)),
        };
        let mut groups = std::collections::BTreeMap::new();
        for (group, group_dir, _) in subdirs(&dir)? {
            let wd = match inotify.watches().add(&group_dir, WATCHED) {
                Ok(wd) => wd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // just removed
                Err(e) => return Err(Error::io(&group_dir, e)),
            };
            let workers = slice.group_workers(&group, &group_dir)?.into_iter().map(Arc::new).collect();
            groups.insert(group, (wd, workers));
        }
        // Watches of groups that are gone went with their directories; adding a watch to a
        // directory already watched returns the same descriptor.
        self.groups = groups;
        self.stale_all = false;
        self.stale.clear();
        Ok(())
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
