//! Per-process facts from `/proc`.
use crate::error::{Error, Result};

/// When process `pid` started, in clock ticks after boot (`/proc/<pid>/stat` field 22).
pub fn start_ticks(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let text = super::read_small(path.as_ref()).map_err(|e| Error::io(&path, e))?;
    parse_start_ticks(&text).ok_or_else(|| {
        Error::io(&path, std::io::Error::new(std::io::ErrorKind::InvalidData, "unparsable stat line"))
    })
}

/// Field 22 of a stat line. The command name (field 2) may hold spaces and parentheses,
/// so fields are counted from the last `)`.
fn parse_start_ticks(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

pub fn clock_ticks_per_s() -> u64 {
    // SAFETY: sysconf has no preconditions.
    match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        t if t > 0 => t as u64,
        _ => 100,
    }
}

/// Seconds since boot, the clock process start times count in.
pub fn boottime_s() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// CPU time of this process, all its threads, user and system, ns.
pub fn self_cpu_ns() -> Result<u64> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out pointer.
    if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } != 0 {
        return Err(Error::io("CLOCK_PROCESS_CPUTIME_ID", std::io::Error::last_os_error()));
    }
    Ok(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// Resident memory of this process (`/proc/self/statm` field 2), bytes.
pub fn self_rss_bytes() -> Result<u64> {
    const PATH: &str = "/proc/self/statm";
    let text = super::read_small(PATH.as_ref()).map_err(|e| Error::io(PATH, e))?;
    let pages: u64 = text.split_whitespace().nth(1).and_then(|v| v.parse().ok()).ok_or_else(|| {
        Error::io(PATH, std::io::Error::new(std::io::ErrorKind::InvalidData, "unparsable statm line"))
    })?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    Ok(pages * page)
}

/// A process's I/O counters (`/proc/<pid>/io`), cumulative over its life and its exited
/// threads (not its children).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessIo {
    pub rchar: u64,
    pub wchar: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
}

impl ProcessIo {
    /// Growth from `earlier`; `None` if any counter went down (not the same process).
    pub fn since(&self, earlier: &ProcessIo) -> Option<ProcessIo> {
        Some(ProcessIo {
            rchar: self.rchar.checked_sub(earlier.rchar)?,
            wchar: self.wchar.checked_sub(earlier.wchar)?,
            read_bytes: self.read_bytes.checked_sub(earlier.read_bytes)?,
            write_bytes: self.write_bytes.checked_sub(earlier.write_bytes)?,
        })
    }

    pub fn add(&mut self, more: &ProcessIo) {
        self.rchar += more.rchar;
        self.wchar += more.wchar;
        self.read_bytes += more.read_bytes;
        self.write_bytes += more.write_bytes;
    }
}

/// `/proc/<pid>/io`. Reading another user's needs the right to ptrace it.
pub fn process_io(pid: u32) -> std::io::Result<ProcessIo> {
    let text = super::read_small(format!("/proc/{pid}/io").as_ref())?;
    parse_io(&text).ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "unparsable io"))
}

fn parse_io(text: &str) -> Option<ProcessIo> {
    let field =
        |name: &str| text.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse().ok());
    Some(ProcessIo {
        rchar: field("rchar:")?,
        wchar: field("wchar:")?,
        read_bytes: field("read_bytes:")?,
        write_bytes: field("write_bytes:")?,
    })
}

/// Host-wide CPU time from the first line of `/proc/stat`, in clock ticks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostCpu {
    pub busy: u64,
    pub total: u64,
}

pub fn host_cpu() -> Result<HostCpu> {
    let text = std::fs::read_to_string("/proc/stat").map_err(|e| Error::io("/proc/stat", e))?;
    parse_host_cpu(&text).ok_or_else(|| {
        Error::io("/proc/stat", std::io::Error::new(std::io::ErrorKind::InvalidData, "no cpu line"))
    })
}

/// `cpu user nice system idle iowait irq softirq steal …`: idle and iowait are not busy;
/// guest time is already inside user and nice.
fn parse_host_cpu(stat: &str) -> Option<HostCpu> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> =
        line.split_whitespace().skip(1).take(8).map(|x| x.parse().ok()).collect::<Option<_>>()?;
    let total: u64 = v.iter().sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some(HostCpu { busy: total - idle, total })
}

/// `MemTotal` and `MemAvailable` from `/proc/meminfo`, in bytes.
pub fn host_memory() -> Result<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/meminfo").map_err(|e| Error::io("/proc/meminfo", e))?;
    let kb = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    match (kb("MemTotal:"), kb("MemAvailable:")) {
        (Some(total), Some(available)) => Ok((total, available)),
        _ => Err(Error::io(
            "/proc/meminfo",
            std::io::Error::new(std::io::ErrorKind::InvalidData, "no MemTotal or MemAvailable"),
        )),
    }
}

/// Used and total bytes of the file system holding `path` (`statvfs`), as `df` counts them.
pub fn disk_usage(path: &std::path::Path) -> Result<(u64, u64)> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::io(path, std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in path")))?;
    // SAFETY: statvfs is plain C data, valid as all zeroes.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(Error::io(path, std::io::Error::last_os_error()));
    }
    let frsize = st.f_frsize as u64;
    let total = st.f_blocks as u64 * frsize;
    Ok((total - st.f_bfree as u64 * frsize, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_ticks_survives_odd_comm() {
        let line = "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_start_ticks(line), Some(987654));
        assert_eq!(parse_start_ticks("1 (x) S 0"), None);
        assert_eq!(parse_start_ticks("garbage"), None);
    }

    #[test]
    fn host_cpu_line() {
        let stat = "cpu  100 5 50 800 20 3 2 10 0 0\ncpu0 1 2 3 4 5 6 7 8\n";
        assert_eq!(parse_host_cpu(stat), Some(HostCpu { busy: 170, total: 990 }));
        assert_eq!(parse_host_cpu("cpu0 1 2 3\n"), None);
        assert_eq!(parse_host_cpu("cpu  1 x 3 4\n"), None);
        let live = host_cpu().unwrap();
        assert!(live.busy <= live.total && live.total > 0);
        let (total, available) = host_memory().unwrap();
        assert!(available <= total && total > 0);
    }

    #[test]
    fn disk_usage_of_root() {
        let (used, total) = disk_usage(std::path::Path::new("/")).unwrap();
        assert!(used <= total && total > 0);
        assert!(disk_usage(std::path::Path::new("/no/such/dir")).is_err());
    }

    #[test]
    fn own_start_time_is_in_the_past() {
        let started = start_ticks(std::process::id()).unwrap() as f64 / clock_ticks_per_s() as f64;
        assert!(started <= boottime_s() + 0.01, "{started} vs {}", boottime_s());
    }

    #[test]
    fn io_counters() {
        let text = "rchar: 10\nwchar: 20\nsyscr: 1\nsyscw: 2\nread_bytes: 4096\nwrite_bytes: 8192\n\
                    cancelled_write_bytes: 0\n";
        let io = parse_io(text).unwrap();
        assert_eq!(io, ProcessIo { rchar: 10, wchar: 20, read_bytes: 4096, write_bytes: 8192 });
        assert_eq!(parse_io("rchar: 1\n"), None);
        let later = ProcessIo { rchar: 15, ..io };
        assert_eq!(later.since(&io), Some(ProcessIo { rchar: 5, ..Default::default() }));
        assert_eq!(io.since(&later), None, "a counter going down is another process");
    }
}
