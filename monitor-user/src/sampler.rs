//! The one place that merges readings and turns counters into rates: it keeps the previous
//! kernel reading and diffs it against the next.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::SystemTime,
};

use monitor_common::{ProbeStats, SliceFilter, TaskEvent, TaskEventKind};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{
    error::Result,
    probes::{
        Availability, Figure, KernelReading, MapSizes, ProbeOptions, Probes, ProgramStatus, WorkerCounters,
        WorkerReading,
    },
    sources::{
        cgroup::{self, Slice, WorkerCgroup, WorkerList},
        memory::{MemoryReading, MemorySource},
        model::ModelNames,
        nvml::{DeviceReading, GpuReading, Gpus},
        pressure::{self, WorkerPressure},
        procfs::{self, HostCpu, ProcessIo},
        KeptFiles,
    },
};

/// One worker in one sample.
#[derive(Clone, Debug)]
pub struct WorkerSample {
    pub cgroup: std::sync::Arc<WorkerCgroup>,
    /// Main process: the oldest process in the worker's cgroups; `None` if it has none.
    pub pid: Option<u32>,
    /// Seconds the main process has been running.
    pub uptime_s: Option<u64>,
    pub processes: usize,
    /// CLOCK_MONOTONIC ns the counters describe.
    pub at_ns: u64,
    /// Cumulative counters since the probes were attached (monotonic).
    pub counters: WorkerCounters,
    /// On-CPU time over the interval, percent of one core.
    pub cpu_pct: Option<f64>,
    /// Run-queue wait over the interval, percent of one task waiting all the time.
    pub runq_wait_pct: Option<f64>,
    /// Bytes per second through read- and write-type system calls over the interval.
    pub syscall_read_bytes_s: Option<f64>,
    pub syscall_write_bytes_s: Option<f64>,
    /// Storage-level bytes per second over the interval: read requests sent to block
    /// devices, and pages dirtied plus direct writes.
    pub storage_read_bytes_s: Option<f64>,
    pub storage_write_bytes_s: Option<f64>,
    /// Whether the I/O counters are known: always with the probes; from the fallback, when
    /// every process's `/proc/<pid>/io` could be read.
    pub io_known: bool,
    /// Whether the process counts are known: not when the kernel's map of them was full and
    /// this worker has no entry in it.
    pub processes_known: bool,
    /// `None` when it could not be read this time (the cause is logged).
    pub memory: Option<MemoryReading>,
    /// From the main process's command line; `None` until read, or when it names none.
    pub model: Option<String>,
    /// `None` when GPU figures are unavailable (no NVML).
    pub gpu: Option<WorkerGpu>,
    /// Pressure stalls of the worker's v2 cgroup, per resource in `pressure::RESOURCES`
    /// order; `None` where its file is absent or unreadable.
    pub pressure: [Option<StallFigures>; 3],
}

/// One resource's pressure stalls: cumulative, and the share of the interval stalled.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StallFigures {
    pub some_ns: Option<u64>,
    pub full_ns: Option<u64>,
    /// Percent of the interval at least one task was stalled (0..100).
    pub some_pct: Option<f64>,
    /// Percent of the interval every non-idle task was stalled at once (0..100).
    pub full_pct: Option<f64>,
}

/// A worker's GPU use, over its processes and devices.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WorkerGpu {
    /// Summed over its processes; 0 when every device was read and the worker is on none;
    /// `None` when that is not known (a device lost or unreadable, or a process whose use
    /// the driver does not report).
    pub vram_bytes: Option<u64>,
    /// Summed per-device SM utilisation (100 = one device fully busy); 0 when every device
    /// was read and the worker is on none; `None` when that is not known (a device lost or
    /// unreadable, or the worker's devices do not report per-process utilisation).
    pub sm_util_pct: Option<f64>,
    /// Per device it is on: (index, VRAM bytes, SM utilisation %).
    pub devices: Vec<(u32, Option<u64>, Option<f64>)>,
}

/// A device's utilisation crossed the threshold: the coordinator may want to pre-warm
/// capacity elsewhere. Sent at most once a minute per device.
#[derive(Clone, Debug, PartialEq)]
pub struct Prewarm {
    pub device: DeviceReading,
    pub threshold_pct: f64,
}

/// Where a figure came from.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Ebpf,
    Procfs,
    Cgroup,
    Nvml,
    Unavailable,
    /// Nothing to measure: the host has no GPU (NVML is unavailable and no NVIDIA driver
    /// is loaded).
    None,
}

/// Where each per-worker figure the probes measure came from in a sample: the probes, a
/// fallback file (`cpu.stat`, `/proc/<pid>/io`), or nowhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FigureSources {
    pub cpu: Source,
    pub runq: Source,
    pub ctx_switches: Source,
    pub io_syscall: Source,
    pub io_read: Source,
    pub io_write: Source,
    pub processes_forked: Source,
    pub execs: Source,
    pub processes_exited: Source,
}

impl FigureSources {
    fn new(availability: &Availability) -> Self {
        let probed_or =
            |f: Figure, fallback: Source| if availability.has(f) { Source::Ebpf } else { fallback };
        FigureSources {
            cpu: probed_or(Figure::Cpu, Source::Cgroup),
            runq: probed_or(Figure::Runq, Source::Unavailable),
            ctx_switches: probed_or(Figure::CtxSwitches, Source::Unavailable),
            io_syscall: probed_or(Figure::IoSyscall, Source::Procfs),
            io_read: probed_or(Figure::IoRead, Source::Procfs),
            io_write: probed_or(Figure::IoWrite, Source::Procfs),
            processes_forked: probed_or(Figure::ProcessesForked, Source::Unavailable),
            execs: probed_or(Figure::Execs, Source::Unavailable),
            processes_exited: probed_or(Figure::ProcessesExited, Source::Unavailable),
        }
    }

    fn io_fallback(&self) -> bool {
        [self.io_syscall, self.io_read, self.io_write].contains(&Source::Procfs)
    }
}

/// What the monitor itself cost over the interval.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SelfCost {
    /// CPU seconds of the daemon, user and system.
    pub cpu_s: f64,
    /// Seconds of that in the kernel running the task iterator.
    pub kernel_s: f64,
    /// Resident memory now.
    pub rss_bytes: u64,
}

/// Settings of a sampler beyond its slice.
#[derive(Clone, Debug)]
pub struct SamplerOptions {
    /// An NVML library to use instead of the system's `libnvidia-ml.so`.
    pub nvml_lib: Option<std::path::PathBuf>,
    /// GPU utilisation above which a pre-warm signal is sent.
    pub prewarm_threshold_pct: f64,
    /// The directory models are stored in, whose file system's usage is reported.
    pub model_dir: Option<std::path::PathBuf>,
    /// Whether the probes must, may or must not be loaded.
    pub bpf: BpfMode,
    pub map_sizes: MapSizes,
    /// Programs, kernel members, tracepoints or helpers to treat as missing (a test switch,
    /// see `probes::WITHHOLD_ENV`).
    pub withhold: std::collections::BTreeSet<String>,
}

/// Without the probes, CPU comes from each worker's `cpu.stat` and there are no run-queue,
/// switch or system-call I/O figures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BpfMode {
    /// Failing to load the probes is an error.
    Required,
    /// Fall back to the cgroup files, with a warning, when the probes cannot be loaded.
    Preferred,
    /// Do not load them.
    Off,
}

impl Default for SamplerOptions {
    fn default() -> Self {
        Self {
            nvml_lib: None,
            prewarm_threshold_pct: 80.0,
            model_dir: None,
            bpf: BpfMode::Required,
            map_sizes: MapSizes::default(),
            withhold: Default::default(),
        }
    }
}

/// The shortest time between two pre-warm signals for one device.
const PREWARM_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Host-wide figures.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostSample {
    /// Busy share of all CPUs over the interval, 0..100.
    pub cpu_pct: Option<f64>,
    pub ram_total: Option<u64>,
    pub ram_available: Option<u64>,
    /// Used and total bytes of the file system holding the model directory, if configured.
    pub model_dir_disk: Option<(u64, u64)>,
}

#[derive(Clone, Debug)]
pub struct Sample {
    /// 1 for the first sample after start.
    pub seq: u64,
    pub wall: SystemTime,
    /// CLOCK_MONOTONIC ns at which the counters were read.
    pub at_ns: u64,
    /// Time since the previous sample; each worker's rates cover its own interval, from its
    /// previous reading to this one, which differs from this by the few microseconds
    /// between the lookups of a pass.
    pub interval_ns: u64,
    pub workers: Vec<WorkerSample>,
    /// Where each probed figure came from.
    pub sources: FigureSources,
    /// Figures the probes do not measure here, by `collector` name, and why.
    pub missing: BTreeMap<&'static str, String>,
    /// Each eBPF program: `attached`, or why it is not. Empty without BPF.
    pub programs: Vec<(&'static str, String)>,
    pub self_cost: SelfCost,
    pub host: HostSample,
    /// `None` when GPU figures are unavailable (no NVML).
    pub gpus: Option<Vec<DeviceReading>>,
    /// Where the GPU figures come from: NVML, nowhere, or nowhere because there is no GPU.
    pub gpu: Source,
    pub prewarm: Vec<Prewarm>,
    pub probe_stats: ProbeStats,
    /// Fork, exec and exit events of the workers' tasks since the previous sample, oldest first
    /// (`probe_stats.events_lost` counts those the ring buffer dropped). Empty without BPF.
    pub events: Vec<TaskEvent>,
}

#[derive(Clone, Copy, Debug)]
struct MainProcess {
    pid: u32,
    start_ticks: u64,
}

pub struct Sampler {
    /// `None` without BPF.
    probes: Option<Probes>,
    sources: FigureSources,
    missing: BTreeMap<&'static str, String>,
    programs: Vec<(&'static str, String)>,
    /// The daemon's CPU time at the last sample, ns.
    last_cpu_ns: u64,
    slice: Slice,
    worker_list: WorkerList,
    filter: SliceFilter,
    prev: KernelReading,
    mains: HashMap<u64, MainProcess>,
    models: ModelNames,
    memory: MemorySource,
    /// Each worker's `cgroup.procs`, kept open.
    procs_files: KeptFiles,
    /// Each worker's `*.pressure` files, kept open.
    pressure_files: KeptFiles,
    /// Worker → CLOCK_MONOTONIC ns of its last pressure reading, and that reading.
    prev_pressure: HashMap<u64, (u64, WorkerPressure)>,
    /// Without the probes: workers whose `cpu.stat` could not be read at the last sample.
    /// Their counter did not move then, so the next interval's growth spans two: no CPU%
    /// for either.
    cpu_unread: HashSet<u64>,
    /// Without the probes: I/O from `/proc/<pid>/io`.
    fallback_io: FallbackIo,
    host_cpu: Option<HostCpu>,
    gpus: Option<Gpus>,
    gpu_source: Source,
    prewarm_threshold_pct: f64,
    model_dir: Option<std::path::PathBuf>,
    /// Device index → when its last pre-warm signal went out.
    prewarmed: HashMap<u32, std::time::Instant>,
    seq: u64,
    clk_tck: u64,
}

impl Sampler {
    /// Loads the probes for `slice` and takes the baseline reading the first rates start from.
    pub fn new(slice: Slice) -> Result<Self> {
        Self::with_options(slice, SamplerOptions::default())
    }

    pub fn with_options(slice: Slice, options: SamplerOptions) -> Result<Self> {
        let probe_options = ProbeOptions { sizes: options.map_sizes, withhold: options.withhold };
        let mut probes = match options.bpf {
            BpfMode::Off => None,
            BpfMode::Required => Some(Probes::load(slice.level(), probe_options)?),
            BpfMode::Preferred => match Probes::load(slice.level(), probe_options) {
                Ok(p) => Some(p),
                Err(e) => {
                    log::warn!(
                        "{e}; falling back to cgroup files: CPU from each worker's cpu.stat, no run-queue \
                         wait or context switches"
                    );
                    None
                }
            },
        };
        let availability = match &probes {
            Some(p) => p.availability().clone(),
            None => Availability::none("no BPF"),
        };
        let missing = availability.missing().map(|(f, why)| (f.name(), why.to_string())).collect();
        let programs = probes
            .as_ref()
            .map(|p| {
                p.programs()
                    .iter()
                    .map(|(name, status)| match status {
                        ProgramStatus::Attached => (*name, "attached".to_string()),
                        ProgramStatus::Unavailable(why) => (*name, format!("unavailable: {why}")),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let filter = slice.filter();
        if let Some(p) = &mut probes {
            p.set_slice(filter)?;
        }
        if filter.id == 0 {
            log::warn!("slice {} does not exist yet; watching for it", slice.dir().display());
        }
        let sources = FigureSources::new(&availability);
        let mut worker_list = WorkerList::default();
        let mut cpu_unread = HashSet::new();
        let mut prev = match &mut probes {
            Some(p) => p.read()?,
            None => KernelReading::default(),
        };
        if sources.cpu == Source::Cgroup {
            cpu_unread = cpu_from_cgroup(&mut prev, &worker_list.current(&slice)?);
        }
        let gpus = Gpus::open(options.nvml_lib.as_deref());
        let gpu_source = match (&gpus, crate::sources::nvml::driver_loaded()) {
            (Some(_), _) => Source::Nvml,
            (None, true) => Source::Unavailable,
            (None, false) => Source::None,
        };
        Ok(Self {
            probes,
            sources,
            missing,
            programs,
            last_cpu_ns: procfs::self_cpu_ns().unwrap_or(0),
            slice,
            worker_list,
            filter,
            prev,
            mains: HashMap::new(),
            models: ModelNames::new(),
            memory: MemorySource::new(v1_memory_mount()),
            procs_files: KeptFiles::default(),
            pressure_files: KeptFiles::default(),
            prev_pressure: HashMap::new(),
            cpu_unread,
            fallback_io: FallbackIo::default(),
            host_cpu: procfs::host_cpu().ok(),
            gpus,
            gpu_source,
            prewarm_threshold_pct: options.prewarm_threshold_pct,
            model_dir: options.model_dir,
            prewarmed: HashMap::new(),
            seq: 0,
            clk_tck: procfs::clock_ticks_per_s(),
        })
    }

    /// GPU utilisation above which a pre-warm signal is sent, from the next sample on.
    pub fn set_prewarm_threshold(&mut self, pct: f64) {
        self.prewarm_threshold_pct = pct;
    }

    /// The directory whose file system's usage is reported, from the next sample on.
    pub fn set_model_dir(&mut self, dir: Option<std::path::PathBuf>) {
        self.model_dir = dir;
    }

    /// The loaded probes; `None` without BPF.
    pub fn probes(&self) -> Option<&Probes> {
        self.probes.as_ref()
    }

    pub fn slice(&self) -> &Slice {
        &self.slice
    }

    pub fn sample(&mut self) -> Result<Sample> {
        let filter = self.slice.filter();
        if filter != self.filter {
            log::info!("slice {} now has cgroup id {}", self.slice.dir().display(), filter.id);
            if let Some(p) = &mut self.probes {
                p.set_slice(filter)?;
            }
            self.filter = filter;
        }
        let cgroups = self.worker_list.current(&self.slice)?;
        let wall = SystemTime::now();
        let mut reading = match &mut self.probes {
            Some(p) => p.read()?,
            None => KernelReading::default(),
        };
        for event in reading.events.iter().filter(|e| e.kind == TaskEventKind::Exec as u32) {
            self.models.forget_pid(event.task.tgid);
        }
        let mut cpu_unknown = HashSet::new();
        if self.sources.cpu == Source::Cgroup {
            let unread = cpu_from_cgroup(&mut reading, &cgroups);
            cpu_unknown = unread.union(&self.cpu_unread).copied().collect();
            self.cpu_unread = unread;
        }
        let interval_ns = reading.at_ns.saturating_sub(self.prev.at_ns);
        let boottime_s = procfs::boottime_s();
        let gpu = self.gpus.as_mut().map(Gpus::read);

        let mut current = std::mem::take(&mut reading.workers);
        // With the process-count map full, a worker without an entry may have had its events
        // dropped: its counts are unknown, not zero.
        let map_full = reading.stats.workers_full > 0;
        let mut workers = Vec::with_capacity(cgroups.len());
        self.memory.begin_sample();
        self.procs_files.sweep();
        self.pressure_files.sweep();
        for cg in cgroups {
            // The iterator found every worker's processes; without it, the cgroup files say.
            let procs = match reading.processes.as_ref() {
                Some(by_worker) => by_worker.get(&cg.id).cloned().unwrap_or_default(),
                None => match cgroup::worker_procs(&cg, &mut self.procs_files) {
                    Ok(p) => p,
                    Err(e) => {
                        log::debug!("worker {}/{} skipped: {e}", cg.group, cg.instance);
                        continue;
                    }
                },
            };
            let main = self.main_process(cg.id, &procs);
            let memory = match self.memory.read(&cg.dir, &procs, main.map(|m| m.pid)) {
                Ok(m) => Some(m),
                Err(e) => {
                    log::debug!("worker {}/{}: memory left out: {e}", cg.group, cg.instance);
                    None
                }
            };
            let model = main.and_then(|m| self.models.get((m.pid, m.start_ticks)));
            let pressure = self.pressure(cg.id, &cg.dir);
            let worker_gpu = gpu.as_ref().map(|g| worker_gpu(g, &procs));
            // A worker without a previous reading had no events before: it starts from zero
            // at the previous pass.
            let prev = self
                .prev
                .workers
                .get(&cg.id)
                .copied()
                .unwrap_or(WorkerReading { at_ns: self.prev.at_ns, ..Default::default() });
            let processes_known = !map_full || current.get(&cg.id).is_some_and(|w| w.processes_counted);
            let mut cur =
                current.get(&cg.id).copied().unwrap_or(WorkerReading { at_ns: reading.at_ns, ..prev });
            let io_known = self.fallback_io_into(cg.id, &procs, &mut cur.counters);
            let counters = monotonic(prev.counters, cur.counters);
            let worker_interval = cur.at_ns.saturating_sub(prev.at_ns);
            let bytes_s =
                |f: fn(&WorkerCounters) -> u64| per_second(f(&prev.counters), f(&counters), worker_interval);
            current.insert(cg.id, WorkerReading { counters, ..cur });
            workers.push(WorkerSample {
                pid: main.map(|m| m.pid),
                uptime_s: main.map(|m| uptime_s(m.start_ticks, self.clk_tck, boottime_s)),
                processes: procs.len(),
                at_ns: cur.at_ns,
                cpu_pct: rate_pct(prev.counters.cpu_ns, counters.cpu_ns, worker_interval)
                    .filter(|_| !cpu_unknown.contains(&cg.id)),
                runq_wait_pct: rate_pct(prev.counters.runq_wait_ns, counters.runq_wait_ns, worker_interval),
                syscall_read_bytes_s: bytes_s(|c| c.syscall_read_bytes),
                storage_read_bytes_s: bytes_s(|c| c.storage_read_bytes),
                storage_write_bytes_s: bytes_s(|c| c.storage_write_bytes),
                syscall_write_bytes_s: bytes_s(|c| c.syscall_write_bytes),
                io_known,
                processes_known,
                memory,
                model,
                gpu: worker_gpu,
                pressure,
                counters,
                cgroup: cg,
            });
        }

        let seen: HashSet<u64> = workers.iter().map(|w| w.cgroup.id).collect();
        if self.sources.io_fallback() {
            self.fallback_io.end_sample(&seen, boottime_s);
        }
        self.forget_removed(&seen, &current);
        self.mains.retain(|id, _| seen.contains(id));
        self.prev_pressure.retain(|id, _| seen.contains(id));
        let live: HashSet<(u32, u64)> = self.mains.values().map(|m| (m.pid, m.start_ticks)).collect();
        self.models.retain(|k| live.contains(k));
        let live_pids: HashSet<u32> = live.iter().map(|m| m.0).collect();
        self.memory.retain_mains(|pid| live_pids.contains(&pid));
        let host = self.host();
        let prewarm = gpu.as_ref().map(|g| self.prewarm(&g.devices)).unwrap_or_default();
        let self_cost = self.self_cost(reading.kernel_ns);
        self.prev = KernelReading { at_ns: reading.at_ns, workers: current, ..Default::default() };
        self.seq += 1;
        Ok(Sample {
            seq: self.seq,
            wall,
            at_ns: reading.at_ns,
            interval_ns,
            workers,
            sources: self.sources,
            missing: self.missing.clone(),
            programs: self.programs.clone(),
            self_cost,
            host,
            gpus: gpu.map(|g| g.devices),
            gpu: self.gpu_source,
            prewarm,
            probe_stats: reading.stats,
            events: reading.events,
        })
    }

    /// Without the probes' I/O figures: the worker's from its processes' `/proc/<pid>/io`,
    /// written into `counters`. `false` when they could not all be read.
    fn fallback_io_into(&mut self, worker: u64, procs: &[u32], counters: &mut WorkerCounters) -> bool {
        if !self.sources.io_fallback() {
            return true;
        }
        let Some(io) = self.fallback_io.worker(worker, procs, self.clk_tck) else { return false };
        let s = &self.sources;
        if s.io_syscall == Source::Procfs {
            (counters.syscall_read_bytes, counters.syscall_write_bytes) = (io.rchar, io.wchar);
        }
        if s.io_read == Source::Procfs {
            counters.storage_read_bytes = io.read_bytes;
        }
        if s.io_write == Source::Procfs {
            counters.storage_write_bytes = io.write_bytes;
        }
        true
    }

    /// The daemon's CPU time since the last sample, and its memory now.
    fn self_cost(&mut self, kernel_ns: u64) -> SelfCost {
        let cpu_ns =
            procfs::self_cpu_ns().map_err(|e| log::debug!("own CPU time left out: {e}")).unwrap_or(0);
        let cpu_s = cpu_ns.saturating_sub(std::mem::replace(&mut self.last_cpu_ns, cpu_ns)) as f64 / 1e9;
        let rss_bytes =
            procfs::self_rss_bytes().map_err(|e| log::debug!("own RSS left out: {e}")).unwrap_or(0);
        SelfCost { cpu_s, kernel_s: kernel_ns as f64 / 1e9, rss_bytes }
    }

    /// Drops the kernel counters of workers whose cgroup is gone. An id counts as gone when
    /// it was counted at the last reading yet missing from this walk; one created after this
    /// walk is not in the last reading, so it is kept until the next walk finds it.
    fn forget_removed(&mut self, seen: &HashSet<u64>, current: &HashMap<u64, WorkerReading>) {
        let gone: Vec<u64> = current
            .keys()
            .filter(|id| !seen.contains(id) && self.prev.workers.contains_key(id))
            .copied()
            .collect();
        for id in gone {
            if let Some(Err(e)) = self.probes.as_mut().map(|p| p.forget(id)) {
                log::warn!("{e}");
            }
        }
    }

    /// Devices above the threshold that have not had a signal within the last minute.
    fn prewarm(&mut self, devices: &[DeviceReading]) -> Vec<Prewarm> {
        let mut out = Vec::new();
        for d in devices {
            let hot = d.utilization_pct.is_some_and(|u| f64::from(u) > self.prewarm_threshold_pct);
            let recent = self.prewarmed.get(&d.index).is_some_and(|at| at.elapsed() < PREWARM_EVERY);
            if hot && !recent {
                self.prewarmed.insert(d.index, std::time::Instant::now());
                out.push(Prewarm { device: d.clone(), threshold_pct: self.prewarm_threshold_pct });
            }
        }
        out
    }

    /// Host CPU over the interval since the last call, and memory now.
    fn host(&mut self) -> HostSample {
        let cpu = procfs::host_cpu().map_err(|e| log::debug!("host CPU left out: {e}")).ok();
        let cpu_pct = match (self.host_cpu, cpu) {
            (Some(a), Some(b)) if b.total > a.total => {
                Some(b.busy.saturating_sub(a.busy) as f64 * 100.0 / (b.total - a.total) as f64)
            }
            _ => None,
        };
        self.host_cpu = cpu;
        let memory = procfs::host_memory().map_err(|e| log::debug!("host memory left out: {e}")).ok();
        let model_dir_disk = self.model_dir.as_deref().and_then(|dir| {
            procfs::disk_usage(dir).map_err(|e| log::debug!("model directory disk usage left out: {e}")).ok()
        });
        HostSample {
            cpu_pct,
            ram_total: memory.map(|m| m.0),
            ram_available: memory.map(|m| m.1),
            model_dir_disk,
        }
    }

    /// A worker's pressure stalls now, with their share of the time since its last reading.
    fn pressure(&mut self, worker: u64, dir: &std::path::Path) -> [Option<StallFigures>; 3] {
        let now = pressure::read(&mut self.pressure_files, dir);
        let at_ns = crate::probes::monotonic_ns();
        let prev = self.prev_pressure.insert(worker, (at_ns, now));
        std::array::from_fn(|i| {
            let cur = now[i]?;
            let (prev_at, prev) = prev.and_then(|(t, p)| Some((t, p[i]?))).unzip();
            let interval = prev_at.map_or(0, |t| at_ns.saturating_sub(t));
            // The kernel timestamps its totals when the file is read, a few µs before
            // `at_ns`: a stall of the whole interval may come out a hair over 100.
            let pct =
                |prev: Option<u64>, cur: Option<u64>| rate_pct(prev?, cur?, interval).map(|p| p.min(100.0));
            Some(StallFigures {
                some_ns: cur.some_ns,
                full_ns: cur.full_ns,
                some_pct: pct(prev.and_then(|p| p.some_ns), cur.some_ns),
                full_pct: pct(prev.and_then(|p| p.full_ns), cur.full_ns),
            })
        })
    }

    /// The oldest of `procs`, cached while it stays in the worker.
    fn main_process(&mut self, worker: u64, procs: &[u32]) -> Option<MainProcess> {
        if let Some(m) = self.mains.get(&worker) {
            if procs.contains(&m.pid) {
                return Some(*m);
            }
        }
        let main = procs
            .iter()
            .filter_map(|&pid| {
                procfs::start_ticks(pid).ok().map(|start_ticks| MainProcess { pid, start_ticks })
            })
            .min_by_key(|m| (m.start_ticks, m.pid))?;
        self.mains.insert(worker, main);
        Some(main)
    }
}

/// Without the probes' CPU figure: each worker's CPU time from its cgroup's `cpu.stat`,
/// which the kernel charges as it charges tasks (running tasks' uncharged time excepted).
/// Returns the workers whose file could not be read.
fn cpu_from_cgroup(reading: &mut KernelReading, workers: &[std::sync::Arc<WorkerCgroup>]) -> HashSet<u64> {
    let mut unread = HashSet::new();
    if reading.at_ns == 0 {
        reading.at_ns = crate::probes::monotonic_ns();
    }
    for w in workers {
        match cgroup::cpu_usage_ns(&w.dir) {
            Ok(cpu_ns) => {
                let at_ns = crate::probes::monotonic_ns();
                let entry =
                    reading.workers.entry(w.id).or_insert(WorkerReading { at_ns, ..Default::default() });
                (entry.at_ns, entry.counters.cpu_ns) = (at_ns, cpu_ns);
            }
            Err(e) => {
                log::debug!("worker {}/{}: CPU left out: {e}", w.group, w.instance);
                unread.insert(w.id);
            }
        }
    }
    unread
}

/// Without the probes, each worker's I/O summed from its processes' `/proc/<pid>/io`. What a
/// process moved counts from when it was first seen: all of it if it started after the last
/// sample, else its growth since. Unlike the probes it loses what a process moved between
/// the last sample and its exit.
#[derive(Default)]
struct FallbackIo {
    /// pid → its counters at the last sample.
    last: HashMap<u32, ProcessIo>,
    /// The same, for the sample being taken.
    seen: HashMap<u32, ProcessIo>,
    /// Worker → bytes counted so far.
    totals: HashMap<u64, ProcessIo>,
    /// CLOCK_BOOTTIME s of the last sample; 0 before the first.
    last_boottime_s: f64,
    warned: bool,
}

impl FallbackIo {
    /// The worker's cumulative counters, or `None` when a process's file could not be read.
    fn worker(&mut self, worker: u64, procs: &[u32], clk_tck: u64) -> Option<ProcessIo> {
        let mut total = self.totals.get(&worker).copied().unwrap_or_default();
        let mut complete = true;
        for &pid in procs {
            let io = match procfs::process_io(pid) {
                Ok(io) => io,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // exited
                Err(e) => {
                    if !std::mem::replace(&mut self.warned, true) {
                        log::warn!("/proc/{pid}/io: {e}; I/O figures of such workers left out");
                    }
                    complete = false;
                    continue;
                }
            };
            let grown = match self.last.get(&pid) {
                Some(earlier) => io.since(earlier),
                None if self.started_since_last(pid, clk_tck) => Some(io),
                None => None,
            };
            if let Some(grown) = grown {
                total.add(&grown);
            }
            self.seen.insert(pid, io);
        }
        self.totals.insert(worker, total);
        complete.then_some(total)
    }

    /// Whether `pid` started after the last sample (never true at the first), to the clock
    /// tick start times are kept in: one started in that sample's tick counts as after it.
    fn started_since_last(&self, pid: u32, clk_tck: u64) -> bool {
        let last_tick = (self.last_boottime_s * clk_tck as f64) as u64;
        self.last_boottime_s > 0.0 && procfs::start_ticks(pid).is_ok_and(|t| t >= last_tick)
    }

    /// Ends a sample: forgets exited processes and removed workers.
    fn end_sample(&mut self, workers: &HashSet<u64>, boottime_s: f64) {
        self.last = std::mem::take(&mut self.seen);
        self.totals.retain(|w, _| workers.contains(w));
        self.last_boottime_s = boottime_s;
    }
}

/// A worker's share of the GPUs: its processes' entries, summed.
fn worker_gpu(gpu: &GpuReading, procs: &[u32]) -> WorkerGpu {
    let mut devices: Vec<(u32, Option<u64>, Option<f64>)> = Vec::new();
    for on in procs.iter().filter_map(|pid| gpu.processes.get(pid)).flatten() {
        let i = match devices.iter().position(|d| d.0 == on.device) {
            Some(i) => i,
            None => {
                devices.push((on.device, Some(0), Some(0.0)));
                devices.len() - 1
            }
        };
        devices[i].1 = devices[i].1.zip(on.vram_bytes).map(|(a, b)| a + b);
        devices[i].2 = devices[i].2.zip(on.sm_util_pct).map(|(a, b)| a + b);
    }
    devices.sort_by_key(|d| d.0);
    let utils: Vec<f64> = devices.iter().filter_map(|d| d.2).collect();
    WorkerGpu {
        vram_bytes: match devices.is_empty() {
            true => gpu.complete.then_some(0),
            false => devices.iter().map(|d| d.1).sum(),
        },
        sm_util_pct: match (devices.is_empty(), utils.is_empty()) {
            (true, _) => gpu.complete.then_some(0.0),
            (false, true) => None,
            (false, false) => Some(utils.iter().sum()),
        },
        devices,
    }
}

/// Where the v1 memory controller is mounted, on a hybrid host (none on a unified one).
fn v1_memory_mount() -> Option<std::path::PathBuf> {
    if cgroup::is_cgroup2(std::path::Path::new("/sys/fs/cgroup")) {
        return None;
    }
    cgroups_rs::fs::hierarchies::V1::new()
        .get_mount_point(cgroups_rs::fs::Controllers::Mem)
        .map(|(mount, _)| mount)
}

/// Percent of one unit over an interval: Δ`value` ns per Δwall ns × 100.
pub fn rate_pct(prev_ns: u64, cur_ns: u64, interval_ns: u64) -> Option<f64> {
    (interval_ns > 0).then(|| cur_ns.saturating_sub(prev_ns) as f64 * 100.0 / interval_ns as f64)
}

/// Δ`value` per second over an interval of `interval_ns`.
pub fn per_second(prev: u64, cur: u64, interval_ns: u64) -> Option<f64> {
    rate_pct(prev, cur, interval_ns).map(|pct| pct * 1e7)
}

/// Counters never go backwards: the in-flight estimate of a reading can exceed what the
/// kernel then charges by a few microseconds, and a consumer must never see a negative rate.
fn monotonic(prev: WorkerCounters, cur: WorkerCounters) -> WorkerCounters {
    WorkerCounters {
        cpu_ns: cur.cpu_ns.max(prev.cpu_ns),
        runq_wait_ns: cur.runq_wait_ns.max(prev.runq_wait_ns),
        runq_waits: cur.runq_waits.max(prev.runq_waits),
        voluntary_switches: cur.voluntary_switches.max(prev.voluntary_switches),
        involuntary_switches: cur.involuntary_switches.max(prev.involuntary_switches),
        syscall_read_bytes: cur.syscall_read_bytes.max(prev.syscall_read_bytes),
        syscall_write_bytes: cur.syscall_write_bytes.max(prev.syscall_write_bytes),
        storage_read_bytes: cur.storage_read_bytes.max(prev.storage_read_bytes),
        storage_write_bytes: cur.storage_write_bytes.max(prev.storage_write_bytes),
        processes_forked: cur.processes_forked.max(prev.processes_forked),
        execs: cur.execs.max(prev.execs),
        processes_exited: cur.processes_exited.max(prev.processes_exited),
    }
}

fn uptime_s(start_ticks: u64, clk_tck: u64, boottime_s: f64) -> u64 {
    (boottime_s - start_ticks as f64 / clk_tck as f64).max(0.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_is_delta_over_wall() {
        assert_eq!(rate_pct(0, 1_000_000_000, 1_000_000_000), Some(100.0));
        assert_eq!(rate_pct(500, 500 + 2_000_000_000, 1_000_000_000), Some(200.0));
        assert_eq!(rate_pct(10, 10 + 250_000_000, 1_000_000_000), Some(25.0));
        assert_eq!(rate_pct(7, 7, 1_000_000_000), Some(0.0));
        assert_eq!(rate_pct(0, 5, 0), None, "no interval, no rate");
        assert_eq!(rate_pct(9, 3, 1_000), Some(0.0), "a counter that went back is no negative rate");
        assert_eq!(per_second(1_000, 1_000 + 5_000_000, 500_000_000), Some(10_000_000.0));
    }

    #[test]
    fn counters_stay_monotonic() {
        let prev = WorkerCounters { cpu_ns: 100, runq_waits: 5, ..Default::default() };
        let cur = WorkerCounters { cpu_ns: 90, runq_waits: 7, ..Default::default() };
        let m = monotonic(prev, cur);
        assert_eq!((m.cpu_ns, m.runq_waits), (100, 7));
    }

    #[test]
    fn uptime_counts_from_start() {
        assert_eq!(uptime_s(1000, 100, 70.5), 60);
        assert_eq!(uptime_s(1000, 100, 5.0), 0, "clock skew never gives a negative uptime");
    }
}
