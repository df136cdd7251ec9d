//! The collector: reads the probes and the files once per interval into plain `Readings`,
//! keeping only what reading needs (open files, caches, the probes). `Sample::new` turns two
//! passes' readings into figures.
use std::{sync::Arc, time::SystemTime};

use monitor_common::{SliceFilter, TaskEventKind};
use rustc_hash::{FxHashMap, FxHashSet};

use crate::{
    error::Result,
    heartbeat::Source,
    probes::{Availability, KernelReading, MapSizes, ProbeOptions, Probes, ProgramStatus, WorkerReading},
    sample::{FigureSources, HostReadings, MainProcess, Prewarm, Readings, Sample, Setup, WorkerReadings},
    sources::{
        cgroup::{self, Slice, WorkerCgroup, WorkerList},
        memory::{FromKernel, MemorySource},
        model::ModelNames,
        nvml::{DeviceReading, Gpus},
        pressure,
        procfs::{self, ProcessIo},
        KeptFiles,
    },
};

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

pub struct Sampler {
    /// `None` without BPF.
    probes: Option<Probes>,
    setup: Arc<Setup>,
    slice: Slice,
    worker_list: WorkerList,
    filter: SliceFilter,
    /// The last pass's readings, which the next sample's rates start from.
    prev: Readings,
    mains: FxHashMap<u64, MainProcess>,
    models: ModelNames,
    memory: MemorySource,
    /// Each worker's `cgroup.procs`, kept open.
    procs_files: KeptFiles,
    /// Each worker's `*.pressure` files, kept open.
    pressure_files: KeptFiles,
    /// Without the probes: I/O from `/proc/<pid>/io`.
    fallback_io: FallbackIo,
    gpus: Option<Gpus>,
    prewarm_threshold_pct: f64,
    model_dir: Option<std::path::PathBuf>,
    /// Device index → when its last pre-warm signal went out.
    prewarmed: FxHashMap<u32, std::time::Instant>,
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
        let gpus = Gpus::open(options.nvml_lib.as_deref());
        let gpu = match (&gpus, crate::sources::nvml::driver_loaded()) {
            (Some(_), _) => Source::Nvml,
            (None, true) => Source::Unavailable,
            (None, false) => Source::None,
        };
        let setup = Arc::new(Setup { sources: FigureSources::new(&availability), missing, programs, gpu });
        let clk_tck = procfs::clock_ticks_per_s();
        let mut sampler = Self {
            probes,
            prev: Readings {
                setup: Arc::clone(&setup),
                seq: 0,
                wall: SystemTime::now(),
                kernel: KernelReading::default(),
                workers: Vec::new(),
                host: HostReadings::default(),
                own_cpu_ns: None,
                own_rss_bytes: None,
                gpu: None,
                boottime_s: 0.0,
                clk_tck,
            },
            setup,
            slice,
            worker_list: WorkerList::default(),
            filter,
            mains: FxHashMap::default(),
            models: ModelNames::new(),
            memory: MemorySource::new(v1_memory_mount()),
            procs_files: KeptFiles::default(),
            pressure_files: KeptFiles::default(),
            fallback_io: FallbackIo::default(),
            gpus,
            prewarm_threshold_pct: options.prewarm_threshold_pct,
            model_dir: options.model_dir,
            prewarmed: FxHashMap::default(),
            clk_tck,
        };
        sampler.prev = sampler.collect(0)?;
        Ok(sampler)
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

    /// Reads everything once and models it against the last reading.
    pub fn sample(&mut self) -> Result<Sample> {
        let readings = self.collect(self.prev.seq + 1)?;
        let mut sample = Sample::new(&self.prev, &readings);
        sample.prewarm = sample.gpus.as_ref().map(|d| self.prewarm(d)).unwrap_or_default();
        self.prev = readings;
        Ok(sample)
    }

    /// One pass over the probes and every worker's files.
    fn collect(&mut self, seq: u64) -> Result<Readings> {
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
        let mut kernel = match &mut self.probes {
            Some(p) => p.read()?,
            None => KernelReading { at_ns: crate::probes::monotonic_ns(), ..Default::default() },
        };
        for event in kernel.events.iter().filter(|e| e.kind == TaskEventKind::Exec as u32) {
            self.models.forget_pid(event.task.tgid);
        }
        let boottime_s = procfs::boottime_s();
        // The baseline leaves the GPUs unread, so that the first interval's utilisation is the
        // mean of every sample the driver holds rather than of none.
        let gpu = self.gpus.as_mut().filter(|_| seq > 0).map(Gpus::read);
        self.memory.begin_sample();
        self.procs_files.sweep();
        self.pressure_files.sweep();
        let mut unstalled = self.unstalled(&kernel);
        let mut processes = kernel.processes.take();
        let mut workers = Vec::with_capacity(cgroups.len());
        for cg in cgroups {
            let pressure = unstalled.remove(&cg.id);
            if let Some(w) = self.worker(cg, &kernel, processes.as_mut(), pressure) {
                workers.push(w);
            }
        }

        let seen: FxHashSet<u64> = workers.iter().map(|w| w.cgroup.id).collect();
        if self.setup.sources.io_fallback() {
            self.fallback_io.end_sample(&seen, boottime_s);
        }
        self.forget_removed(&seen, &kernel.workers);
        self.mains.retain(|id, _| seen.contains(id));
        let live: FxHashSet<(u32, u64)> = self.mains.values().map(|m| (m.pid, m.start_ticks)).collect();
        self.models.retain(|k| live.contains(k));
        let live_pids: FxHashSet<u32> = live.iter().map(|m| m.0).collect();
        self.memory.retain_mains(|pid| live_pids.contains(&pid));
        Ok(Readings {
            setup: Arc::clone(&self.setup),
            seq,
            wall,
            kernel,
            workers,
            host: self.host(),
            own_cpu_ns: procfs::self_cpu_ns().map_err(|e| log::debug!("own CPU time left out: {e}")).ok(),
            own_rss_bytes: procfs::self_rss_bytes().map_err(|e| log::debug!("own RSS left out: {e}")).ok(),
            gpu,
            boottime_s,
            clk_tck: self.clk_tck,
        })
    }

    /// Workers none of whose tasks can have stalled since their pressure files were last
    /// read, with what the files said then. None of their tasks was queued to run or in an
    /// uninterruptible sleep at the last pass or at this one, and none was switched out,
    /// forked, exec'd or ended in between; a task only enters a stall by running, so the
    /// files' totals cannot have grown. Reading three files per idle worker was most of the
    /// daemon's cost on a host of many workers.
    fn unstalled(&self, kernel: &KernelReading) -> FxHashMap<u64, pressure::WorkerPressure> {
        let (Some(now), Some(then)) = (&kernel.may_stall, &self.prev.kernel.may_stall) else {
            return FxHashMap::default();
        };
        if self.setup.sources.ctx_switches != Source::Ebpf {
            return FxHashMap::default();
        }
        let activity = |r: &KernelReading, id: u64| {
            r.workers.get(&id).map(|w| {
                let c = w.counters;
                [
                    c.voluntary_switches,
                    c.involuntary_switches,
                    c.processes_forked,
                    c.execs,
                    c.processes_exited,
                ]
            })
        };
        let quiet = |id: u64| {
            !now.contains(&id)
                && !then.contains(&id)
                && activity(kernel, id) == activity(&self.prev.kernel, id)
        };
        let mut unstalled = FxHashMap::with_capacity_and_hasher(self.prev.workers.len(), Default::default());
        unstalled.extend(
            self.prev.workers.iter().filter(|w| quiet(w.cgroup.id)).map(|w| (w.cgroup.id, w.pressure)),
        );
        unstalled
    }

    /// One worker's files; `None` when its processes cannot be listed. `processes`: every
    /// worker's, as the iterator found them; its own are moved out. `unstalled`: its
    /// pressure as last read, when it cannot have changed since (see `unstalled`).
    fn worker(
        &mut self,
        cg: Arc<WorkerCgroup>,
        kernel: &KernelReading,
        processes: Option<&mut FxHashMap<u64, Vec<u32>>>,
        unstalled: Option<pressure::WorkerPressure>,
    ) -> Option<WorkerReadings> {
        // The iterator found every worker's processes; without it, the cgroup files say.
        let procs = match processes {
            Some(by_worker) => by_worker.remove(&cg.id).unwrap_or_default(),
            None => match cgroup::worker_procs(&cg, &mut self.procs_files) {
                Ok(p) => p,
                Err(e) => {
                    log::debug!("worker {}/{} skipped: {e}", cg.group, cg.instance);
                    return None;
                }
            },
        };
        let main = self.main_process(cg.id, &procs);
        let from_kernel = FromKernel {
            processes: kernel.memory.as_ref().and_then(|m| m.get(&cg.id).copied()),
            main_cgroup: kernel
                .memory_cgroups
                .as_ref()
                .zip(main)
                .and_then(|(m, main)| m.get(&main.pid).copied()),
        };
        let memory = match self.memory.read((&cg.dir, cg.id), &procs, main.map(|m| m.pid), from_kernel) {
            Ok(m) => Some(m),
            Err(e) => {
                log::debug!("worker {}/{}: memory left out: {e}", cg.group, cg.instance);
                None
            }
        };
        let model = main.and_then(|m| self.models.get((m.pid, m.start_ticks)));
        let sources = self.setup.sources;
        let cpu_stat = (sources.cpu == Source::Cgroup)
            .then(|| match cgroup::cpu_usage_ns(&cg.dir) {
                Ok(ns) => Some((crate::probes::monotonic_ns(), ns)),
                Err(e) => {
                    log::debug!("worker {}/{}: CPU left out: {e}", cg.group, cg.instance);
                    None
                }
            })
            .flatten();
        let process_io =
            sources.io_fallback().then(|| self.fallback_io.worker(cg.id, &procs, self.clk_tck)).flatten();
        let pressure = unstalled.unwrap_or_else(|| pressure::read(&mut self.pressure_files, &cg.dir));
        Some(WorkerReadings {
            pressure_at_ns: crate::probes::monotonic_ns(),
            pressure,
            cgroup: cg,
            procs,
            main,
            cpu_stat,
            process_io,
            memory,
            model,
        })
    }

    /// Drops the kernel counters of workers whose cgroup is gone. An id counts as gone when
    /// it was counted at the last reading yet missing from this walk; one created after this
    /// walk is not in the last reading, so it is kept until the next walk finds it.
    fn forget_removed(&mut self, seen: &FxHashSet<u64>, current: &FxHashMap<u64, WorkerReading>) {
        let gone: Vec<u64> = current
            .keys()
            .filter(|id| !seen.contains(id) && self.prev.kernel.workers.contains_key(id))
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

    fn host(&self) -> HostReadings {
        HostReadings {
            cpu: procfs::host_cpu().map_err(|e| log::debug!("host CPU left out: {e}")).ok(),
            memory: procfs::host_memory().map_err(|e| log::debug!("host memory left out: {e}")).ok(),
            model_dir_disk: self.model_dir.as_deref().and_then(|dir| {
                procfs::disk_usage(dir)
                    .map_err(|e| log::debug!("model directory disk usage left out: {e}"))
                    .ok()
            }),
        }
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

/// Without the probes, each worker's I/O summed from its processes' `/proc/<pid>/io`. What a
/// process moved counts from when it was first seen: all of it if it started after the last
/// sample, else its growth since. Unlike the probes it loses what a process moved between
/// the last sample and its exit.
#[derive(Default)]
struct FallbackIo {
    /// pid → its counters at the last sample.
    last: FxHashMap<u32, ProcessIo>,
    /// The same, for the sample being taken.
    seen: FxHashMap<u32, ProcessIo>,
    /// Worker → bytes counted so far.
    totals: FxHashMap<u64, ProcessIo>,
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
    fn end_sample(&mut self, workers: &FxHashSet<u64>, boottime_s: f64) {
        self.last = std::mem::take(&mut self.seen);
        self.totals.retain(|w, _| workers.contains(w));
        self.last_boottime_s = boottime_s;
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
