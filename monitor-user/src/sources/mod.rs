//! Readers of kernel files. Each returns typed readings, never heartbeat JSON.
pub mod cgroup;
pub mod memory;
pub mod model;
pub mod nvml;
pub mod pressure;
pub mod procfs;

/// The whole of a small kernel-generated file (`/proc`, cgroup files). Unlike
/// `std::fs::read_to_string` it asks for no size hint (a `statx` and an `lseek` per file,
/// meaningless for these files), which matters at thousands of reads a second.
pub fn read_small(path: &std::path::Path) -> std::io::Result<String> {
    read_from_start(&std::fs::File::open(path)?, &mut Vec::new())
}

/// Kernel files kept open from one sample to the next and read again from offset 0, which
/// makes the kernel generate them afresh: no path walk, open or close per read. A file
/// whose object is gone (a removed cgroup: ENODEV; an exited process: ESRCH, also when its
/// pid was reused) fails to read and is opened again by path. Files not read during a
/// sample are closed at the next `sweep`. All `KeptFiles` together keep at most what the
/// open-files limit leaves after `FD_RESERVE`; beyond that a file is read the plain way.
#[derive(Default)]
pub struct KeptFiles {
    /// Keyed by the path's bytes: hashing and comparing a `Path` walks its components,
    /// which showed in profiles at thousands of reads a second (as did std's SipHash).
    files: rustc_hash::FxHashMap<std::ffi::OsString, (std::fs::File, bool)>,
    /// Reused by every read: a fresh zeroed page per file was a tenth of the reading.
    buf: Vec<u8>,
}

/// Descriptors left for everything else: sockets, the probes' maps and programs, libraries,
/// directory walks.
const FD_RESERVE: usize = 256;

/// Files kept open by all `KeptFiles` of the process.
static KEPT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Read once: the daemon raises its limit before the first sample, and asking the kernel
/// on every read of a file not kept would add a system call to the per-sample path.
fn kept_limit() -> usize {
    static LIMIT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: a valid pointer to a rlimit.
        let soft = match unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } {
            0 => usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX),
            _ => 1024,
        };
        soft.saturating_sub(FD_RESERVE)
    })
}

impl KeptFiles {
    pub fn read(&mut self, path: &std::path::Path) -> std::io::Result<String> {
        use std::sync::atomic::Ordering::Relaxed;
        if let Some((file, used)) = self.files.get_mut(path.as_os_str()) {
            *used = true;
            match read_from_start(file, &mut self.buf) {
                Ok(text) => return Ok(text),
                Err(_) => self.forget(path),
            }
        }
        if KEPT.load(Relaxed) >= kept_limit() {
            return read_from_start(&std::fs::File::open(path)?, &mut self.buf);
        }
        let file = std::fs::File::open(path)?;
        let text = read_from_start(&file, &mut self.buf)?;
        self.files.insert(path.as_os_str().to_owned(), (file, true));
        KEPT.fetch_add(1, Relaxed);
        Ok(text)
    }

    fn forget(&mut self, path: &std::path::Path) {
        if self.files.remove(path.as_os_str()).is_some() {
            KEPT.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Closes the files not read since the last sweep.
    pub fn sweep(&mut self) {
        let before = self.files.len();
        self.files.retain(|_, (_, used)| std::mem::take(used));
        KEPT.fetch_sub(before - self.files.len(), std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for KeptFiles {
    fn drop(&mut self) {
        KEPT.fetch_sub(self.files.len(), std::sync::atomic::Ordering::Relaxed);
    }
}

/// Reads until the end, or until a short read of under half a page: these files are
/// seq_files, which fill the caller's buffer until the end or until their own page-sized
/// buffer cannot take the next record (each well under half a page here), so such a read
/// ends the file. That spares a second system call per file, which for thousands of files
/// a sample is a large part of the daemon's cost.
fn read_from_start(file: &std::fs::File, buf: &mut Vec<u8>) -> std::io::Result<String> {
    use std::os::unix::fs::FileExt;
    const BUF: usize = 4096;
    if buf.len() < BUF {
        buf.resize(BUF, 0);
    }
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(len * 2, 0);
        }
        let asked = buf.len() - len;
        match file.read_at(&mut buf[len..], len as u64) {
            Ok(0) => break,
            Ok(n) => {
                len += n;
                if n < asked && len < BUF / 2 {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    std::str::from_utf8(&buf[..len])
        .map(str::to_owned)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}
