//! One daemon per slice: two would load the probes twice and send every heartbeat twice.
//! The first takes an exclusive `flock` on a file named after the slice and holds it for
//! its life; the kernel drops it when the process ends, however it ends.
use std::{
    io::{Read, Seek, Write},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use crate::error::{Error, Result};

/// Where the lock files live; the temporary directory when this is not writable (a run
/// without privilege, which then locks only against others like it).
const LOCK_DIR: &str = "/run/hive-monitor";

/// Held while the daemon runs.
pub struct SliceLock {
    _file: std::fs::File,
}

impl SliceLock {
    /// Takes the lock of the slice at `slice_dir`, or says who holds it.
    pub fn take(slice_dir: &Path) -> Result<Self> {
        let name = slice_dir.to_string_lossy().trim_matches('/').replace('/', "-");
        let file_name = format!("hive-monitor-{name}.lock");
        let mut failure = None;
        let mut opened = None;
        for dir in [PathBuf::from(LOCK_DIR), std::env::temp_dir()] {
            let _ = std::fs::create_dir_all(&dir);
            let path = dir.join(&file_name);
            let file =
                std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path);
            match file {
                Ok(f) => {
                    opened = Some((f, path));
                    break;
                }
                Err(e) => failure = Some(Error::io(&path, e)),
            }
        }
        let Some((mut file, path)) = opened else {
            return Err(failure.expect("a directory was tried"));
        };
        // SAFETY: a valid descriptor.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(Error::io(&path, e));
            }
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            return Err(Error::AlreadyRunning {
                slice: slice_dir.to_path_buf(),
                lock: path,
                pid: holder.trim().parse().ok(),
            });
        }
        let pid = format!("{}\n", std::process::id());
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(pid.as_bytes()))
            .map_err(|e| Error::io(&path, e))?;
        Ok(Self { _file: file })
    }
}
