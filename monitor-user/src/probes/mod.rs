//! Loading and attaching the eBPF programs, and reading what they count: the task iterator
//! once per pass, the task events since the last pass, and the process counts.
pub mod figures;
mod layout;
pub mod ledger;

use std::{collections::BTreeSet, io::Read as _};

use aya::{
    maps::{Array, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{BtfTracePoint, Iter},
    Btf, Ebpf, EbpfLoader,
};
use monitor_common::{
    names, CgroupMemory, IterRecord, ProbeStats, ProcessCounts, ProcessMemory, SliceFilter, TaskEvent,
    TaskEventKind, EXIT_PROCESS, MAX_WORKERS, MISSING, TASK_EXITING, TASK_HAS_MEMORY, TASK_HAS_MEMORY_CGROUP,
    TASK_MAY_STALL, TASK_MEMORY_UNREADABLE,
};

use self::{figures::PROGRAMS, layout::Missing, ledger::Ledger};
pub use self::{
    figures::{Availability, Figure, ProgramStatus},
    ledger::{Counters, WorkerCounters},
};
use rustc_hash::{FxHashMap, FxHashSet};

use crate::error::{Error, Result};

/// The object `build.rs` compiled from `monitor-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/monitor"));

/// A test switch of `hive-monitor run`: programs, kernel members, tracepoints or helpers
/// (`helper:NAME`) to treat as missing, comma-separated, so the degradation of each can be
/// tested on one kernel.
pub const WITHHOLD_ENV: &str = "HIVE_MONITOR_WITHHOLD";

/// `WITHHOLD_ENV`'s names.
pub fn withheld_from_env() -> BTreeSet<String> {
    std::env::var(WITHHOLD_ENV)
        .map(|v| v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect())
        .unwrap_or_default()
}

/// How to load the probes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProbeOptions {
    pub sizes: MapSizes,
    /// Names to treat as missing (see `WITHHOLD_ENV`).
    pub withhold: BTreeSet<String>,
}

/// The longest a pass waits for exited tasks' final counters (see `finals_of_the_unseen`).
const FREE_WAIT: std::time::Duration = std::time::Duration::from_millis(50);

/// How many entries the kernel maps hold; what does not fit is counted in `ProbeStats`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    /// Workers with process counts (`WORKERS`).
    pub workers: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self { workers: MAX_WORKERS }
    }
}

/// The loaded probes, each attached or with the reason it is not. Dropping this detaches them.
pub struct Probes {
    sizes: MapSizes,
    workers: PerCpuHashMap<MapData, u64, ProcessCounts>,
    slice: Array<MapData, SliceFilter>,
    stats: PerCpuArray<MapData, ProbeStats>,
    events: RingBuf<MapData>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    programs: Vec<(&'static str, ProgramStatus)>,
    availability: Availability,
    ledger: Ledger,
    /// Workers whose process counts changed since they were last read, and those counts.
    process_counts: FxHashMap<u64, ProcessCounts>,
    events_lost: u64,
    /// Whether the iterator reads processes' resident memory, and their memory cgroups'
    /// counters, on this kernel.
    reads_memory: bool,
    reads_memory_cgroups: bool,
    ebpf: Ebpf,
}

/// One worker's counters, as of one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerReading {
    /// CLOCK_MONOTONIC ns the counters describe.
    pub at_ns: u64,
    pub counters: WorkerCounters,
    /// Whether the kernel's map of process counts has an entry for the worker.
    pub processes_counted: bool,
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
    pub workers: FxHashMap<u64, WorkerReading>,
    pub stats: ProbeStats,
    /// CPU time this thread spent in the kernel running the task iterator, ns.
    pub kernel_ns: u64,
    /// Fork, exec and process-exit events since the last pass, oldest first.
    pub events: Vec<TaskEvent>,
    /// Worker cgroup id → its processes (thread group ids, sorted) not exiting, as the
    /// iterator found them; `None` without the iterator. The sampler moves each worker's
    /// list into its readings.
    pub processes: Option<FxHashMap<u64, Vec<u32>>>,
    /// Workers with a task that may be stalled (`TASK_MAY_STALL`) as the iterator passed it;
    /// `None` without the iterator.
    pub may_stall: Option<FxHashSet<u64>>,
    /// Worker cgroup id → the resident memory of those processes, summed; a worker is absent
    /// when it has none, or when a process's could not be read (then `/proc` says). `None`
    /// where the iterator cannot read memory on this kernel.
    pub memory: Option<FxHashMap<u64, ProcessMemory>>,
    /// Process (thread group id) → the memory cgroup it is charged to, with that cgroup's
    /// counters; `None` where the iterator cannot read them on this kernel.
    pub memory_cgroups: Option<FxHashMap<u32, CgroupMemory>>,
}

/// What one pass of the task iterator found besides the ledger's counts.
struct Pass {
    at_ns: u64,
    kernel_ns: u64,
    processes: FxHashMap<u64, Vec<u32>>,
    may_stall: FxHashSet<u64>,
    memory: FxHashMap<u64, ProcessMemory>,
    memory_cgroups: FxHashMap<u32, CgroupMemory>,
}

impl Probes {
    /// Checks privileges, resolves the kernel layout from BTF, loads and attaches every
    /// program this kernel can run for a slice `slice_level` deep below the cgroup2 root
    /// (fixed for their life). A program that cannot be loaded costs only its figures
    /// (`availability`); only a failure of them all is an error.
    pub fn load(slice_level: u32, options: ProbeOptions) -> Result<Self> {
        check_capabilities()?;
        let ProbeOptions { sizes, withhold: withheld } = options;
        if !withheld.is_empty() {
            log::warn!("withheld (test switch): {withheld:?}");
        }
        let no_btf = |reason: String| Error::NoBtf { path: layout::VMLINUX_BTF.into(), reason };
        let resolved = layout::resolve_running_kernel(slice_level, &withheld)?;
        log::debug!("kernel layout: {:?}", resolved.layout);
        for (name, why) in &resolved.missing {
            log::warn!("kernel BTF: {name}: {why}");
        }

        // The object has no CO-RE relocations (offsets come from `LAYOUT`), so the loader needs
        // no kernel BTF: dropping the copy `EbpfLoader::new` parsed keeps one parse at a time.
        let mut ebpf = EbpfLoader::new()
            .btf(None)
            .override_global(names::GLOBAL_LAYOUT, &resolved.layout, true)
            .map_max_entries(names::MAP_WORKERS, sizes.workers)
            .load(OBJECT)?;
        // SAFETY: malloc_trim has no preconditions.
        unsafe { libc::malloc_trim(0) };
        // The logger owns the log ring buffer: it must live as long as the programs.
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                log::debug!("eBPF logger not initialised: {e}");
                None
            }
        };
        let aya_btf = Btf::from_sys_fs().map_err(|e| no_btf(e.to_string()))?;
        let programs: Vec<_> = PROGRAMS
            .into_iter()
            .map(|name| {
                let status = match load_program(&mut ebpf, name, &aya_btf, &resolved.missing, &withheld) {
                    Ok(()) => ProgramStatus::Attached,
                    Err(why) => {
                        log::warn!(
                            "eBPF program {name} not attached: {why}; the figures that need it are left out"
                        );
                        ProgramStatus::Unavailable(why)
                    }
                };
                (name, status)
            })
            .collect();
        // Parsing the kernel's BTF took tens of MiB that are free now; hand them back rather
        // than keep them resident for the daemon's life.
        drop(aya_btf);
        // SAFETY: malloc_trim has no preconditions.
        unsafe { libc::malloc_trim(0) };
        if programs.iter().all(|(_, s)| *s != ProgramStatus::Attached) {
            let why = programs.iter().map(|(n, s)| format!("{n}: {s:?}")).collect::<Vec<_>>().join("; ");
            return Err(Error::NoProgram(why));
        }
        let availability = Availability::new(&programs, &resolved.missing);
        let reads_memory = resolved.layout.task_mm != MISSING && resolved.layout.mm_rss_stat != MISSING;
        let reads_memory_cgroups = resolved.layout.css_set_memory != MISSING;
        Ok(Self {
            sizes,
            workers: take_map(&mut ebpf, names::MAP_WORKERS)?,
            slice: take_map(&mut ebpf, names::MAP_SLICE)?,
            stats: take_map(&mut ebpf, names::MAP_STATS)?,
            events: take_map(&mut ebpf, names::MAP_EVENTS)?,
            logger,
            programs,
            availability,
            ledger: Ledger::default(),
            process_counts: FxHashMap::default(),
            events_lost: 0,
            reads_memory,
            reads_memory_cgroups,
            ebpf,
        })
    }

    pub fn map_sizes(&self) -> MapSizes {
        self.sizes
    }

    /// Each program, attached or why not.
    pub fn programs(&self) -> &[(&'static str, ProgramStatus)] {
        &self.programs
    }

    /// Which figures the probes measure on this kernel.
    pub fn availability(&self) -> &Availability {
        &self.availability
    }

    /// Points the probes at a slice (`id` 0: none, count nothing).
    pub fn set_slice(&mut self, filter: SliceFilter) -> Result<()> {
        self.slice.set(0, filter, 0).map_err(|source| Error::Map { map: names::MAP_SLICE, source })
    }

    /// Forgets the counters of a worker whose cgroup is gone.
    pub fn forget(&mut self, worker: u64) -> Result<()> {
        self.ledger.forget(worker);
        self.process_counts.remove(&worker);
        match self.workers.remove(&worker) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(Error::Map { map: names::MAP_WORKERS, source }),
        }
    }

    /// Each program's run count and total run time, from its file descriptor's fdinfo.
    /// The kernel counts them only while `kernel.bpf_stats_enabled` is 1.
    pub fn program_stats(&self) -> Result<Vec<ProgramStats>> {
        use std::os::fd::{AsFd, AsRawFd};
        self.ebpf
            .programs()
            .filter_map(|(name, program)| program.fd().ok().map(|fd| (name, fd)))
            .map(|(name, fd)| {
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

    /// The workers with process counts in the kernel (`WORKERS`'s keys).
    pub fn worker_ids(&self) -> Result<Vec<u64>> {
        self.workers
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|source| Error::Map { map: names::MAP_WORKERS, source })
    }

    /// Tasks reaped whose final counters have not come yet (see `finals_of_the_unseen`).
    pub fn finals_awaited(&self) -> usize {
        self.ledger.awaiting_end()
    }

    /// Tasks the loader follows between passes.
    pub fn tasks_followed(&self) -> usize {
        self.ledger.tasks()
    }

    /// One pass: the task events since the last pass, then every worker task's counters
    /// through the iterator, folded into per-worker totals; never waits.
    pub fn read(&mut self) -> Result<KernelReading> {
        if let Some(logger) = &mut self.logger {
            logger.flush();
        }
        let mut events = self.drain_events();
        self.ledger.begin_pass();
        let (at_ns, kernel_ns, processes, may_stall, memory, memory_cgroups) =
            match self.availability_of_iterator() {
                true => self.iterate().map(|p| {
                    let memory = self.reads_memory.then_some(p.memory);
                    let memory_cgroups = self.reads_memory_cgroups.then_some(p.memory_cgroups);
                    (p.at_ns, p.kernel_ns, Some(p.processes), Some(p.may_stall), memory, memory_cgroups)
                })?,
                false => (monotonic_ns(), 0, None, None, None, None),
            };
        events.extend(self.finals_of_the_unseen());
        self.ledger.end_pass(at_ns);

        let stats = self.stats.get(&0, 0).map_err(|source| Error::Map { map: names::MAP_STATS, source })?;
        let stats = stats.iter().fold(ProbeStats::default(), |a, s| ProbeStats {
            workers_full: a.workers_full + s.workers_full,
            read_errors: a.read_errors + s.read_errors,
            too_deep: a.too_deep + s.too_deep,
            events_lost: a.events_lost + s.events_lost,
        });
        // Events lost: any worker's process counts may have changed.
        let lost = std::mem::replace(&mut self.events_lost, stats.events_lost) != stats.events_lost;
        let changed: FxHashSet<u64> = match lost {
            true => self.ledger.totals().keys().chain(self.process_counts.keys()).copied().collect(),
            false => events.iter().filter(|e| counts_process(e)).map(|e| e.task.worker).collect(),
        };
        for worker in changed {
            match self.workers.get(&worker, 0) {
                Ok(per_cpu) => {
                    let sum = per_cpu.iter().fold(ProcessCounts::default(), |a, c| ProcessCounts {
                        forked: a.forked + c.forked,
                        execs: a.execs + c.execs,
                        exited: a.exited + c.exited,
                    });
                    self.process_counts.insert(worker, sum);
                }
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(source) => return Err(Error::Map { map: names::MAP_WORKERS, source }),
            }
        }
        for (&worker, counts) in &self.process_counts {
            let t = self.ledger.totals_mut(worker);
            (t.processes_forked, t.execs, t.processes_exited) = (counts.forked, counts.execs, counts.exited);
        }
        let workers = self
            .ledger
            .totals()
            .iter()
            .map(|(&id, &counters)| {
                let processes_counted = self.process_counts.contains_key(&id);
                (id, WorkerReading { at_ns, counters, processes_counted })
            })
            .collect();
        let events = events
            .into_iter()
            .filter(|e| e.kind != TaskEventKind::Free as u32 && e.kind != TaskEventKind::Moved as u32)
            .collect();
        Ok(KernelReading {
            at_ns,
            workers,
            stats,
            kernel_ns,
            events,
            processes,
            may_stall,
            memory,
            memory_cgroups,
        })
    }

    fn availability_of_iterator(&self) -> bool {
        self.programs.iter().any(|(n, s)| *n == figures::TASK_COUNTERS && *s == ProgramStatus::Attached)
    }

    /// The task events since the last call, oldest first, with the counters they carry
    /// folded into the ledger.
    fn drain_events(&mut self) -> Vec<TaskEvent> {
        let mut events = Vec::new();
        while let Some(item) = self.events.next() {
            if item.len() != std::mem::size_of::<TaskEvent>() {
                continue;
            }
            // SAFETY: the size matches, TaskEvent is plain old data, and the read is unaligned.
            let event = unsafe { item.as_ptr().cast::<TaskEvent>().read_unaligned() };
            match event.kind {
                k if k == TaskEventKind::Free as u32 => self.ledger.end(&event.task),
                k if k == TaskEventKind::Exit as u32 => self.ledger.exit(&event.task, event.at_ns),
                k if k == TaskEventKind::Moved as u32 => self.ledger.moved(&event.task),
                _ => self.ledger.note(&event.task),
            }
            events.push(event);
        }
        events
    }

    /// Events that bring the final counters of tasks that exited and are gone from this
    /// pass. They come once the task is freed after an RCU grace period; until then what it
    /// ran after its exit began (closing files, notifying its parent: ~0.1 ms) is missing.
    /// Waits for them up to `FREE_WAIT`; later ones count in the next pass.
    fn finals_of_the_unseen(&mut self) -> Vec<TaskEvent> {
        use std::os::fd::AsRawFd;
        let deadline = std::time::Instant::now() + FREE_WAIT;
        let mut events = self.drain_events();
        while self.ledger.awaiting_end() > 0 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            let mut fd = libc::pollfd { fd: self.events.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd; a failed or timed-out poll only ends the wait sooner.
            unsafe { libc::poll(&mut fd, 1, left.as_millis().max(1) as i32) };
            events.extend(self.drain_events());
        }
        events
    }

    /// Runs the task iterator once and folds its records into the ledger.
    fn iterate(&mut self) -> Result<Pass> {
        let program: &mut Iter = self
            .ebpf
            .program_mut(figures::TASK_COUNTERS)
            .ok_or(Error::NoProgram(figures::TASK_COUNTERS.into()))?
            .try_into()
            .map_err(|source| Error::Program { program: figures::TASK_COUNTERS, source })?;
        let link =
            program.attach().map_err(|source| Error::Program { program: figures::TASK_COUNTERS, source })?;
        let link = program
            .take_link(link)
            .map_err(|source| Error::Program { program: figures::TASK_COUNTERS, source })?;
        let mut file = link.into_file().map_err(|e| Error::Iterator(e.to_string()))?;
        // Yielding updates this CPU's run-queue clock, which the iterator measures the
        // scheduler clock against (see `monitor-ebpf`'s `clock_offset`).
        // SAFETY: sched_yield has no preconditions.
        unsafe { libc::sched_yield() };
        let at_ns = monotonic_ns();
        let cpu_before = thread_cpu_ns();
        let mut bytes = Vec::with_capacity(64 * 1024);
        file.read_to_end(&mut bytes).map_err(|e| Error::Iterator(e.to_string()))?;
        let kernel_ns = thread_cpu_ns().saturating_sub(cpu_before);
        const SIZE: usize = std::mem::size_of::<IterRecord>();
        let mut processes: FxHashMap<u64, Vec<u32>> = FxHashMap::default();
        let mut may_stall = FxHashSet::default();
        let mut memory: FxHashMap<u64, ProcessMemory> = FxHashMap::default();
        let mut memory_unreadable = FxHashSet::default();
        let mut memory_cgroups = FxHashMap::default();
        for chunk in bytes.chunks_exact(SIZE) {
            // SAFETY: each chunk is one IterRecord the program wrote, plain old data.
            let IterRecord { task: record, memory: m, memory_cgroup } =
                unsafe { chunk.as_ptr().cast::<IterRecord>().read_unaligned() };
            self.ledger.record(&record);
            if record.flags & TASK_EXITING == 0 {
                processes.entry(record.worker).or_default().push(record.tgid);
                if record.flags & TASK_HAS_MEMORY != 0 {
                    let sum = memory.entry(record.worker).or_default();
                    sum.file_pages += m.file_pages;
                    sum.anon_pages += m.anon_pages;
                    sum.shmem_pages += m.shmem_pages;
                }
                if record.flags & TASK_MEMORY_UNREADABLE != 0 {
                    memory_unreadable.insert(record.worker);
                }
                if record.flags & TASK_HAS_MEMORY_CGROUP != 0 {
                    memory_cgroups.insert(record.tgid, memory_cgroup);
                }
            }
            if record.flags & TASK_MAY_STALL != 0 {
                may_stall.insert(record.worker);
            }
        }
        memory.retain(|worker, _| !memory_unreadable.contains(worker));
        for pids in processes.values_mut() {
            pids.sort_unstable();
            pids.dedup();
        }
        Ok(Pass { at_ns, kernel_ns, processes, may_stall, memory, memory_cgroups })
    }
}

/// Whether an event changes its worker's process counts.
fn counts_process(e: &TaskEvent) -> bool {
    e.kind == TaskEventKind::Fork as u32
        || e.kind == TaskEventKind::Exec as u32
        || (e.kind == TaskEventKind::Exit as u32 && e.flags & EXIT_PROCESS != 0)
}

/// Loads and attaches one program, unless this kernel lacks something it needs.
fn load_program(
    ebpf: &mut Ebpf,
    name: &'static str,
    btf: &Btf,
    missing: &Missing,
    withheld: &BTreeSet<String>,
) -> std::result::Result<(), String> {
    if withheld.contains(name) {
        return Err(format!("withheld by {WITHHOLD_ENV}"));
    }
    for need in figures::all_needs(name) {
        if withheld.contains(need) {
            return Err(format!("{need} withheld by {WITHHOLD_ENV}"));
        }
        if let Some(why) = missing.get(need) {
            return Err(format!("no {need} ({why})"));
        }
    }
    let program = ebpf.program_mut(name).ok_or_else(|| format!("program {name} missing from the object"))?;
    let result = match name {
        figures::TASK_COUNTERS => {
            let p: &mut Iter = program.try_into().map_err(|e: aya::programs::ProgramError| e.to_string())?;
            p.load("task", btf).map_err(|e| e.to_string())
        }
        _ => {
            let p: &mut BtfTracePoint =
                program.try_into().map_err(|e: aya::programs::ProgramError| e.to_string())?;
            p.load(name, btf).and_then(|()| p.attach().map(drop)).map_err(|e| e.to_string())
        }
    };
    result.map_err(|e: String| short_reason(&e))
}

/// A load error's text, with a verifier log cut to its last five lines: the instruction
/// refused, why, and the verifier's totals.
fn short_reason(e: &str) -> String {
    let mut lines = e.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or_default();
    let rest: Vec<&str> = lines.collect();
    match rest.len() {
        0 => first.to_string(),
        n => format!("{first} … {}", rest[n.saturating_sub(5)..].join(" / ")),
    }
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
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// CPU time of the calling thread.
fn thread_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer; CLOCK_MONOTONIC is the clock bpf_ktime_get_ns() reads.
    unsafe { libc::clock_gettime(clock, &mut ts) };
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
    use aya_obj::{Object, ProgramSection};
    use monitor_common::KernelLayout;

    use super::names;

    /// Every map, program and global the loader asks for by name is in the embedded object,
    /// found the way the loader finds it: parsed by aya's own object parser (`EbpfLoader`
    /// parses with it, then looks maps and programs up by these names, and patches `LAYOUT`
    /// with `override_global`). Each program is in the section its type needs. No privilege:
    /// nothing is loaded into the kernel.
    #[test]
    fn the_object_has_every_name_the_loader_uses() {
        let mut object = Object::parse(super::OBJECT).expect("aya parses the embedded eBPF object");
        for map in names::MAPS {
            assert!(
                object.maps.contains_key(map),
                "no map {map} in the eBPF object; it has {:?}",
                object.maps.keys().collect::<Vec<_>>()
            );
        }
        for program in names::PROGRAMS {
            let found = object.programs.get(program).unwrap_or_else(|| {
                panic!(
                    "no program {program} in the eBPF object; it has {:?}",
                    object.programs.keys().collect::<Vec<_>>()
                )
            });
            let section_fits = match (program, &found.section) {
                (names::TASK_COUNTERS, ProgramSection::Iter { sleepable: false }) => true,
                (names::TASK_COUNTERS, _) => false,
                (_, section) => matches!(section, ProgramSection::BtfTracePoint),
            };
            assert!(section_fits, "program {program} is in a {:?} section", found.section);
            let function = object.functions.get(&found.function_key());
            assert!(function.is_some_and(|f| !f.instructions.is_empty()), "program {program} has no code");
        }
        // `override_global(GLOBAL_LAYOUT, .., true)` does exactly this: it fails for a symbol
        // the object lacks, or one of another size than `KernelLayout`.
        let marker = vec![0xa5; size_of::<KernelLayout>()];
        object
            .patch_map_data([(names::GLOBAL_LAYOUT, (&marker[..], true))].into())
            .unwrap_or_else(|e| panic!("global {}: {e}", names::GLOBAL_LAYOUT));
        let rodata = object
            .maps
            .iter()
            .filter(|(name, _)| name.starts_with(".rodata"))
            .find(|(_, map)| map.data().windows(marker.len()).any(|w| w == &marker[..]));
        assert!(
            rodata.is_some(),
            "global {} is not in .rodata (frozen, as the verifier needs)",
            names::GLOBAL_LAYOUT
        );
    }
}
