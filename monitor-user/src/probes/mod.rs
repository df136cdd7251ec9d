//! Loading and attaching the eBPF program, and reading what it counts.
mod layout;

use std::collections::HashMap;

use aya::{
    maps::{Array, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::BtfTracePoint,
    Btf, Ebpf, EbpfLoader,
};
use monitor_common::{IoSyscalls, ProbeStats, SliceFilter, TaskEvent, WorkerCounters, MAX_WORKERS};

use crate::error::{Error, Result};

/// The object `build.rs` compiled from `monitor-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/monitor"));

/// The programs, each attached (`tp_btf`) to the tracepoint of its name.
const PROGRAMS: [&str; 8] = [
    "sched_stat_runtime",
    "sched_switch",
    "sys_exit",
    "block_bio_queue",
    "writeback_dirty_folio",
    "sched_process_fork",
    "sched_process_exec",
    "sched_process_exit",
];

/// This architecture's read-type, write-type and both-ways system calls (rchar/wchar).
#[cfg(target_arch = "x86_64")]
const IO_SYSCALLS: IoSyscalls = IoSyscalls {
    // read, pread64, readv, preadv, preadv2
    read: [0, 17, 19, 295, 327],
    // write, pwrite64, writev, pwritev, pwritev2
    write: [1, 18, 20, 296, 328],
    // sendfile, copy_file_range
    both: [40, 326],
};
#[cfg(target_arch = "aarch64")]
const IO_SYSCALLS: IoSyscalls =
    IoSyscalls { read: [63, 67, 65, 69, 286], write: [64, 68, 66, 70, 287], both: [71, 285] };

/// How many entries the kernel maps hold; what does not fit is counted in `ProbeStats`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    /// Workers with counters (`WORKERS`).
    pub workers: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self { workers: MAX_WORKERS }
    }
}

/// The loaded, attached probes. Dropping this detaches them.
pub struct Probes {
    sizes: MapSizes,
    workers: PerCpuHashMap<MapData, u64, WorkerCounters>,
    slice: Array<MapData, SliceFilter>,
    stats: PerCpuArray<MapData, ProbeStats>,
    events: RingBuf<MapData>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    ebpf: Ebpf,
}

/// One worker's counters, summed over CPUs, as of one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerReading {
    /// CLOCK_MONOTONIC ns the counters describe.
    pub at_ns: u64,
    /// `cpu_ns` includes the time the worker's running tasks accrued since the kernel last
    /// charged them; `running_since_ns` is 0.
    pub counters: WorkerCounters,
}

/// What the kernel measured of one program (with `kernel.bpf_stats_enabled`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProgramStats {
    pub name: String,
    pub run_count: u64,
    pub run_time_ns: u64,
}

/// Every worker's counters, read in one pass.
#[derive(Clone, Debug, Default)]
pub struct KernelReading {
    /// CLOCK_MONOTONIC ns at which the pass started.
    pub at_ns: u64,
    /// Worker cgroup id → its reading.
    pub workers: HashMap<u64, WorkerReading>,
    pub stats: ProbeStats,
}

/// Uncharged time above this is not believed: a task is charged at every tick (4 ms at
/// HZ=250) and at least once a second with `nohz_full`, so an older start means a switch
/// was missed, and this bounds what such a miss can add.
const MAX_UNCHARGED_NS: u64 = 1_000_000_000;

impl Probes {
    /// Checks privileges, resolves the kernel layout from BTF, loads and attaches the
    /// programs for a slice `slice_level` deep below the cgroup2 root (fixed for their life).
    pub fn load(slice_level: u32, sizes: MapSizes) -> Result<Self> {
        check_capabilities()?;
        let no_btf = |reason: String| Error::NoBtf { path: layout::VMLINUX_BTF.into(), reason };
        let btf = btf_rs::Btf::from_file(layout::VMLINUX_BTF).map_err(|e| no_btf(e.to_string()))?;
        let kernel_layout = layout::resolve(&btf, slice_level)?;
        // Each parse of the kernel's BTF takes tens of MiB: one at a time keeps the peak down.
        drop(btf);
        // SAFETY: malloc_trim has no preconditions.
        unsafe { libc::malloc_trim(0) };
        let aya_btf = Btf::from_sys_fs().map_err(|e| no_btf(e.to_string()))?;
        log::debug!("kernel layout: {kernel_layout:?}");

        let mut ebpf = EbpfLoader::new()
            .override_global("LAYOUT", &kernel_layout, true)
            .override_global("IO_SYSCALLS", &IO_SYSCALLS, true)
            .map_max_entries("WORKERS", sizes.workers)
            .load(OBJECT)?;
        // The logger owns the log ring buffer: it must live as long as the programs.
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                log::debug!("eBPF logger not initialised: {e}");
                None
            }
        };
        for name in PROGRAMS {
            let program: &mut BtfTracePoint = ebpf
                .program_mut(name)
                .ok_or_else(|| Error::Btf(format!("program {name} missing from the object")))?
                .try_into()
                .map_err(|source| Error::Program { program: name, source })?;
            program.load(name, &aya_btf).map_err(|source| Error::Program { program: name, source })?;
            program.attach().map_err(|source| Error::Program { program: name, source })?;
        }
        // Parsing the kernel's BTF took tens of MiB that are free now; hand them back rather
        // than keep them resident for the daemon's life.
        drop(aya_btf);
        // SAFETY: malloc_trim has no preconditions.
        unsafe { libc::malloc_trim(0) };
        Ok(Self {
            sizes,
            workers: take_map(&mut ebpf, "WORKERS")?,
            slice: take_map(&mut ebpf, "SLICE")?,
            stats: take_map(&mut ebpf, "STATS")?,
            events: take_map(&mut ebpf, "EVENTS")?,
            logger,
            ebpf,
        })
    }

    pub fn map_sizes(&self) -> MapSizes {
        self.sizes
    }

    /// Points the probes at a slice (`id` 0: none, count nothing).
    pub fn set_slice(&mut self, filter: SliceFilter) -> Result<()> {
        self.slice.set(0, filter, 0).map_err(|source| Error::Map { map: "SLICE", source })
    }

    /// Forgets the counters of a worker whose cgroup is gone.
    pub fn forget(&mut self, worker: u64) -> Result<()> {
        match self.workers.remove(&worker) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(Error::Map { map: "WORKERS", source }),
        }
    }

    /// Each program's run count and total run time, from its file descriptor's fdinfo.
    /// The kernel counts them only while `kernel.bpf_stats_enabled` is 1.
    pub fn program_stats(&self) -> Result<Vec<ProgramStats>> {
        use std::os::fd::{AsFd, AsRawFd};
        self.ebpf
            .programs()
            .map(|(name, program)| {
                let fd = program.fd().map_err(|source| Error::Program { program: "stats", source })?;
                let path = format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd());
                let info = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
                let field = |key: &str| {
                    info.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim().parse().ok())
                };
                Ok(ProgramStats {
                    name: name.to_string(),
                    run_count: field("run_cnt:").unwrap_or(0),
                    run_time_ns: field("run_time_ns:").unwrap_or(0),
                })
            })
            .collect()
    }

    /// The workers with counters in the kernel (`WORKERS`'s keys).
    pub fn worker_ids(&self) -> Result<Vec<u64>> {
        self.workers.keys().collect::<Result<_, _>>().map_err(|source| Error::Map { map: "WORKERS", source })
    }

    /// The lifecycle events sent since the last call, oldest first; never waits.
    pub fn drain_events(&mut self) -> Vec<TaskEvent> {
        let mut events = Vec::new();
        while let Some(item) = self.events.next() {
            if item.len() == std::mem::size_of::<TaskEvent>() {
                // SAFETY: the size matches, TaskEvent is plain old data, and the read is unaligned.
                events.push(unsafe { item.as_ptr().cast::<TaskEvent>().read_unaligned() });
            }
        }
        events
    }

    /// Reads every worker's counters, each with the time its running tasks have not been
    /// charged for yet, measured against a clock read just before that worker's lookup.
    pub fn read(&mut self) -> Result<KernelReading> {
        if let Some(logger) = &mut self.logger {
            logger.flush();
        }
        let map_err = |map| move |source| Error::Map { map, source };
        let at_ns = monotonic_ns();
        let mut workers = HashMap::new();
        for id in self.worker_ids()? {
            let now = monotonic_ns();
            let per_cpu = match self.workers.get(&id, 0) {
                Ok(v) => v,
                Err(aya::maps::MapError::KeyNotFound) => continue, // forgotten meanwhile
                Err(source) => return Err(Error::Map { map: "WORKERS", source }),
            };
            workers.insert(id, WorkerReading { at_ns: now, counters: sum(per_cpu.iter(), now) });
        }
        let stats = self.stats.get(&0, 0).map_err(map_err("STATS"))?;
        let stats = stats.iter().fold(ProbeStats::default(), |a, s| ProbeStats {
            workers_full: a.workers_full + s.workers_full,
            read_errors: a.read_errors + s.read_errors,
            too_deep: a.too_deep + s.too_deep,
            events_lost: a.events_lost + s.events_lost,
        });
        Ok(KernelReading { at_ns, workers, stats })
    }
}

/// Sums one worker's per-CPU slots, adding to `cpu_ns` each slot's time since its running
/// task was last charged. A slot charged after `now` adds nothing: its counters are then
/// exact as of that charge, a moment after `now`.
fn sum<'a>(slots: impl Iterator<Item = &'a WorkerCounters>, now: u64) -> WorkerCounters {
    slots.fold(WorkerCounters::default(), |a, v| {
        let uncharged = match v.running_since_ns {
            0 => 0,
            since => now.saturating_sub(since).min(MAX_UNCHARGED_NS),
        };
        WorkerCounters {
            cpu_ns: a.cpu_ns + v.cpu_ns + uncharged,
            runq_wait_ns: a.runq_wait_ns + v.runq_wait_ns,
            runq_waits: a.runq_waits + v.runq_waits,
            voluntary_switches: a.voluntary_switches + v.voluntary_switches,
            involuntary_switches: a.involuntary_switches + v.involuntary_switches,
            syscall_read_bytes: a.syscall_read_bytes + v.syscall_read_bytes,
            syscall_write_bytes: a.syscall_write_bytes + v.syscall_write_bytes,
            storage_read_bytes: a.storage_read_bytes + v.storage_read_bytes,
            storage_write_bytes: a.storage_write_bytes + v.storage_write_bytes,
            processes_forked: a.processes_forked + v.processes_forked,
            execs: a.execs + v.execs,
            processes_exited: a.processes_exited + v.processes_exited,
            running_since_ns: 0,
        }
    })
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(Error::Map { map: name, source: aya::maps::MapError::InvalidName { name: name.into() } })?;
    T::try_from(map).map_err(|source| Error::Map { map: name, source })
}

pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer; CLOCK_MONOTONIC is the clock bpf_ktime_get_ns() reads.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CAP_BPF (or CAP_SYS_ADMIN) to load, CAP_PERFMON (or CAP_SYS_ADMIN) to read kernel memory.
fn check_capabilities() -> Result<()> {
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let status =
        std::fs::read_to_string("/proc/self/status").map_err(|e| Error::io("/proc/self/status", e))?;
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| eff & (1 << cap) != 0;
    let missing = match (has(CAP_BPF) || has(CAP_SYS_ADMIN), has(CAP_PERFMON) || has(CAP_SYS_ADMIN)) {
        (true, true) => return Ok(()),
        (false, false) => "CAP_BPF and CAP_PERFMON",
        (false, true) => "CAP_BPF",
        (true, false) => "CAP_PERFMON",
    };
    Err(Error::NotPrivileged { missing })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(cpu_ns: u64, running_since_ns: u64) -> WorkerCounters {
        WorkerCounters { cpu_ns, running_since_ns, voluntary_switches: 1, ..Default::default() }
    }

    #[test]
    fn uncharged_time_of_running_slots_is_added() {
        let slots = [slot(1_000, 0), slot(2_000, 9_000), slot(3_000, 9_500)];
        let c = sum(slots.iter(), 10_000);
        assert_eq!(c.cpu_ns, 1_000 + 2_000 + 1_000 + 3_000 + 500);
        assert_eq!(c.voluntary_switches, 3);
        assert_eq!(c.running_since_ns, 0);
    }

    #[test]
    fn a_charge_after_the_clock_read_adds_nothing() {
        assert_eq!(sum([slot(5_000, 10_200)].iter(), 10_000).cpu_ns, 5_000);
    }

    #[test]
    fn a_stale_start_adds_at_most_the_cap() {
        let c = sum([slot(0, 1)].iter(), 1 + 10 * MAX_UNCHARGED_NS);
        assert_eq!(c.cpu_ns, MAX_UNCHARGED_NS);
    }
}
