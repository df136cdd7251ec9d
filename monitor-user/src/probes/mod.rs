//! Loading and attaching the eBPF program, and reading what it counts.
mod layout;

use std::collections::{hash_map::Entry, HashMap};

use aya::{
    maps::{Array, MapData, PerCpuArray, PerCpuHashMap},
    programs::BtfTracePoint,
    Btf, Ebpf, EbpfLoader,
};
use monitor_common::{ProbeStats, RunningTask, SliceFilter, WorkerCounters};

use crate::error::{Error, Result};

/// The object `build.rs` compiled from `monitor-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/monitor"));

/// The programs, each attached (`tp_btf`) to the scheduler tracepoint of its name.
const PROGRAMS: [&str; 4] = ["sched_stat_runtime", "sched_switch", "sched_wakeup", "sched_wakeup_new"];

/// The loaded, attached probes. Dropping this detaches them.
pub struct Probes {
    workers: PerCpuHashMap<MapData, u64, WorkerCounters>,
    running: Array<MapData, RunningTask>,
    slice: Array<MapData, SliceFilter>,
    stats: PerCpuArray<MapData, ProbeStats>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    _ebpf: Ebpf,
}

/// What each worker's tasks were charged, read in one pass.
#[derive(Clone, Debug, Default)]
pub struct KernelReading {
    /// CLOCK_MONOTONIC nanoseconds at which the in-flight time was measured.
    pub at_ns: u64,
    /// Worker cgroup id → counters summed over CPUs, with `cpu_ns` including the time the
    /// worker's running tasks accrued since the kernel last charged them.
    pub workers: HashMap<u64, WorkerCounters>,
    pub stats: ProbeStats,
}

impl Probes {
    /// Checks privileges, resolves the kernel layout from BTF, loads and attaches the
    /// programs for a slice `slice_level` deep below the cgroup2 root (fixed for their life).
    pub fn load(slice_level: u32) -> Result<Self> {
        check_capabilities()?;
        let no_btf = |reason: String| Error::NoBtf { path: layout::VMLINUX_BTF.into(), reason };
        let btf = btf_rs::Btf::from_file(layout::VMLINUX_BTF).map_err(|e| no_btf(e.to_string()))?;
        let kernel_layout = layout::resolve(&btf, slice_level)?;
        let aya_btf = Btf::from_sys_fs().map_err(|e| no_btf(e.to_string()))?;
        log::debug!("kernel layout: {kernel_layout:?}");
        let cpus = aya::util::nr_cpus().map_err(|(path, e)| Error::io(path, e))? as u32;

        let mut ebpf = EbpfLoader::new()
            .override_global("LAYOUT", &kernel_layout, true)
            .map_max_entries("RUNNING", cpus)
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
        Ok(Self {
            workers: take_map(&mut ebpf, "WORKERS")?,
            running: take_map(&mut ebpf, "RUNNING")?,
            slice: take_map(&mut ebpf, "SLICE")?,
            stats: take_map(&mut ebpf, "STATS")?,
            logger,
            _ebpf: ebpf,
        })
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

    /// Reads every worker's counters and adds the in-flight time of workers' running tasks.
    pub fn read(&mut self) -> Result<KernelReading> {
        if let Some(logger) = &mut self.logger {
            logger.flush();
        }
        let map_err = |map| move |source| Error::Map { map, source };
        let mut workers = HashMap::new();
        for entry in self.workers.iter() {
            let (id, per_cpu) = entry.map_err(map_err("WORKERS"))?;
            workers.insert(id, sum(per_cpu.iter()));
        }
        let (at_ns, inflight) = self.inflight()?;
        // Read after the bulk pass, so never older than what it replaces.
        workers.extend(inflight);
        let stats = self.stats.get(&0, 0).map_err(map_err("STATS"))?;
        let stats = stats.iter().fold(ProbeStats::default(), |a, s| ProbeStats {
            workers_full: a.workers_full + s.workers_full,
            queued_full: a.queued_full + s.queued_full,
            read_errors: a.read_errors + s.read_errors,
            too_deep: a.too_deep + s.too_deep,
        });
        Ok(KernelReading { at_ns, workers, stats })
    }

    /// For each worker running on some CPU now: its charged CPU time plus the time since the
    /// kernel last charged it, read consistently. A charge landing between reading `RUNNING`
    /// and the counters would be counted twice, so the pair is re-read until `RUNNING` did
    /// not move in between (three tries; then the last reading, off by at most one charge).
    fn inflight(&self) -> Result<(u64, HashMap<u64, WorkerCounters>)> {
        let mut result = HashMap::new();
        let mut now = monotonic_ns();
        for _ in 0..3 {
            result.clear();
            let before = self.running_workers()?;
            for r in &before {
                if let Entry::Vacant(slot) = result.entry(r.worker) {
                    slot.insert(match self.workers.get(&r.worker, 0) {
                        Ok(per_cpu) => sum(per_cpu.iter()),
                        Err(aya::maps::MapError::KeyNotFound) => WorkerCounters::default(),
                        Err(source) => return Err(Error::Map { map: "WORKERS", source }),
                    });
                }
            }
            now = monotonic_ns();
            let after = self.running_workers()?;
            for r in &after {
                if let Some(c) = result.get_mut(&r.worker) {
                    c.cpu_ns += now.saturating_sub(r.since_ns);
                }
            }
            if before == after {
                break;
            }
        }
        Ok((now, result))
    }

    fn running_workers(&self) -> Result<Vec<RunningTask>> {
        let mut out = Vec::new();
        for r in self.running.iter() {
            let r = r.map_err(|source| Error::Map { map: "RUNNING", source })?;
            if r.worker != 0 {
                out.push(r);
            }
        }
        Ok(out)
    }
}

fn sum<'a>(values: impl Iterator<Item = &'a WorkerCounters>) -> WorkerCounters {
    values.fold(WorkerCounters::default(), |a, v| WorkerCounters {
        cpu_ns: a.cpu_ns + v.cpu_ns,
        runq_wait_ns: a.runq_wait_ns + v.runq_wait_ns,
        runq_waits: a.runq_waits + v.runq_waits,
        voluntary_switches: a.voluntary_switches + v.voluntary_switches,
        involuntary_switches: a.involuntary_switches + v.involuntary_switches,
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
