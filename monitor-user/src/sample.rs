//! The model: one pure function, `Sample::new`, from two passes' readings to what the
//! heartbeat reports. Every rate, and every figure left null, is decided here and only here;
//! the sampler collects, the heartbeat formats.
use std::{collections::BTreeMap, sync::Arc, time::SystemTime};

use monitor_common::{ProbeStats, TaskEvent};
use rustc_hash::FxHashMap;

pub use crate::probes::Counters;
use crate::{
    probes::{Availability, Figure, KernelReading},
    sources::{
        cgroup::WorkerCgroup,
        memory::MemoryReading,
        nvml::{DeviceReading, GpuReading},
        pressure::WorkerPressure,
        procfs::{HostCpu, ProcessIo},
    },
};

/// Where a figure came from.
pub use crate::heartbeat::Source;

/// What a sampler measures, fixed when it starts.
#[derive(Clone, Debug)]
pub struct Setup {
    /// Where each probed figure comes from.
    pub sources: FigureSources,
    /// Figures the probes do not measure here, by `collector` name, and why.
    pub missing: BTreeMap<&'static str, String>,
    /// Each eBPF program: `attached`, or why it is not. Empty without BPF.
    pub programs: Vec<(&'static str, String)>,
    /// Where the GPU figures come from: NVML, nowhere, or nowhere because there is no GPU.
    pub gpu: Source,
}

/// Everything one pass read, before any rate or null is decided.
#[derive(Clone, Debug)]
pub struct Readings {
    pub setup: Arc<Setup>,
    /// 0 for the baseline a sampler takes when it starts, then 1, 2, …
    pub seq: u64,
    pub wall: SystemTime,
    /// The probes' pass: workers' counters, the probes' health, task events. Without BPF only
    /// `at_ns` is set.
    pub kernel: KernelReading,
    pub workers: Vec<WorkerReadings>,
    pub host: HostReadings,
    /// The daemon's own CPU time (ns) and resident memory (bytes), when readable.
    pub own_cpu_ns: Option<u64>,
    pub own_rss_bytes: Option<u64>,
    /// `None` when GPU figures are unavailable (no NVML).
    pub gpu: Option<GpuReading>,
    /// CLOCK_BOOTTIME s, and the clock ticks per second process start times are kept in.
    pub boottime_s: f64,
    pub clk_tck: u64,
}

/// What the files said of one worker cgroup.
#[derive(Clone, Debug)]
pub struct WorkerReadings {
    pub cgroup: Arc<WorkerCgroup>,
    /// Its processes (thread group ids).
    pub procs: Vec<u32>,
    /// The oldest of them; `None` if it has none.
    pub main: Option<MainProcess>,
    /// Where the probes do not measure CPU: when the cgroup's `cpu.stat` was read
    /// (CLOCK_MONOTONIC ns) and its usage, ns; `None` when not read.
    pub cpu_stat: Option<(u64, u64)>,
    /// Where the probes do not measure I/O: the processes' `/proc/<pid>/io`, summed since
    /// each was first seen; `None` when one of them could not be read.
    pub process_io: Option<ProcessIo>,
    /// `None` when it could not be read (the cause is logged).
    pub memory: Option<MemoryReading>,
    /// From the main process's command line; `None` until read, or when it names none.
    pub model: Option<Arc<str>>,
    /// CLOCK_MONOTONIC ns the pressure files were read, and what they said; for a worker none
    /// of whose tasks can have stalled since the last pass, what they said then (the files
    /// are not read again).
    pub pressure_at_ns: u64,
    pub pressure: WorkerPressure,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MainProcess {
    pub pid: u32,
    /// Clock ticks after boot it started at.
    pub start_ticks: u64,
}

/// Host-wide readings.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostReadings {
    pub cpu: Option<HostCpu>,
    /// Total and available bytes.
    pub memory: Option<(u64, u64)>,
    /// Used and total bytes of the file system holding the model directory, if configured.
    pub model_dir_disk: Option<(u64, u64)>,
}

/// Which figure each counter belongs to: what decides whether it is measured, and where from.
const FIGURES: Counters<Figure> = Counters {
    cpu_ns: Figure::Cpu,
    runq_wait_ns: Figure::Runq,
    runq_waits: Figure::Runq,
    voluntary_switches: Figure::CtxSwitches,
    involuntary_switches: Figure::CtxSwitches,
    syscall_read_bytes: Figure::IoSyscall,
    syscall_write_bytes: Figure::IoSyscall,
    storage_read_bytes: Figure::IoRead,
    storage_write_bytes: Figure::IoWrite,
    processes_forked: Figure::ProcessesForked,
    execs: Figure::Execs,
    processes_exited: Figure::ProcessesExited,
};

/// One worker in one sample.
#[derive(Clone, Debug)]
pub struct WorkerSample {
    pub cgroup: Arc<WorkerCgroup>,
    /// Main process: the oldest process in the worker's cgroups; `None` if it has none.
    pub pid: Option<u32>,
    /// Seconds the main process has been running.
    pub uptime_s: Option<u64>,
    pub processes: usize,
    /// CLOCK_MONOTONIC ns the counters describe.
    pub at_ns: u64,
    /// Cumulative counters since the probes were attached; `None` where not measured.
    pub totals: Counters<Option<u64>>,
    /// Each counter's growth per second over the worker's interval, from its previous
    /// reading to this one; `None` where either end is unknown.
    pub per_s: Counters<Option<f64>>,
    /// `None` when it could not be read this time (the cause is logged).
    pub memory: Option<MemoryReading>,
    pub model: Option<Arc<str>>,
    /// `None` when GPU figures are unavailable (no NVML).
    pub gpu: Option<WorkerGpu>,
    /// Pressure stalls of the worker's v2 cgroup, per resource in `pressure::RESOURCES`
    /// order; `None` where its file is absent or unreadable.
    pub pressure: [Option<StallFigures>; 3],
}

impl WorkerSample {
    /// On-CPU time over the interval, percent of one core.
    pub fn cpu_pct(&self) -> Option<f64> {
        self.per_s.cpu_ns.map(|ns| ns / 1e7)
    }

    /// Run-queue wait over the interval, percent of one task waiting all the time.
    pub fn runq_wait_pct(&self) -> Option<f64> {
        self.per_s.runq_wait_ns.map(|ns| ns / 1e7)
    }
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
    pub fn new(availability: &Availability) -> Self {
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

    pub fn of(&self, figure: Figure) -> Source {
        match figure {
            Figure::Cpu => self.cpu,
            Figure::Runq => self.runq,
            Figure::CtxSwitches => self.ctx_switches,
            Figure::IoSyscall => self.io_syscall,
            Figure::IoRead => self.io_read,
            Figure::IoWrite => self.io_write,
            Figure::ProcessesForked => self.processes_forked,
            Figure::Execs => self.execs,
            Figure::ProcessesExited => self.processes_exited,
        }
    }

    /// Whether some I/O figure comes from `/proc/<pid>/io`.
    pub fn io_fallback(&self) -> bool {
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
    /// Filled in by the sampler, which remembers when each device was last signalled.
    pub prewarm: Vec<Prewarm>,
    pub probe_stats: ProbeStats,
    /// Fork, exec and exit events of the workers' tasks since the previous sample, oldest first
    /// (`probe_stats.events_lost` counts those the ring buffer dropped). Empty without BPF.
    pub events: Vec<TaskEvent>,
}

impl Sample {
    /// The sample `cur` makes after `prev`: every rate over the time between them.
    pub fn new(prev: &Readings, cur: &Readings) -> Self {
        let before: FxHashMap<u64, &WorkerReadings> = prev.workers.iter().map(|w| (w.cgroup.id, w)).collect();
        let workers =
            cur.workers.iter().map(|w| worker(prev, before.get(&w.cgroup.id).copied(), cur, w)).collect();
        let setup = &cur.setup;
        Sample {
            seq: cur.seq,
            wall: cur.wall,
            at_ns: cur.kernel.at_ns,
            interval_ns: cur.kernel.at_ns.saturating_sub(prev.kernel.at_ns),
            workers,
            sources: setup.sources,
            missing: setup.missing.clone(),
            programs: setup.programs.clone(),
            self_cost: SelfCost {
                cpu_s: cur
                    .own_cpu_ns
                    .zip(prev.own_cpu_ns)
                    .map_or(0.0, |(c, p)| c.saturating_sub(p) as f64 / 1e9),
                kernel_s: cur.kernel.kernel_ns as f64 / 1e9,
                rss_bytes: cur.own_rss_bytes.unwrap_or(0),
            },
            host: host(&prev.host, &cur.host),
            gpus: cur.gpu.as_ref().map(|g| g.devices.clone()),
            gpu: setup.gpu,
            prewarm: Vec::new(),
            probe_stats: cur.kernel.stats,
            events: cur.kernel.events.clone(),
        }
    }
}

/// One worker's figures: `prev` is its readings at the previous pass, if it was there.
fn worker(prev: &Readings, was: Option<&WorkerReadings>, cur: &Readings, w: &WorkerReadings) -> WorkerSample {
    let (at_ns, totals) = counters(cur, w);
    // A worker first seen now had nothing counted at the previous pass.
    let (prev_at_ns, prev_totals) = match was {
        Some(was) => counters(prev, was),
        None => (prev.kernel.at_ns, Counters::default().map(|()| Some(0))),
    };
    let interval = at_ns.saturating_sub(prev_at_ns);
    let per_s = prev_totals.zip(totals).map(|(p, c)| per_second(p?, c?, interval));
    WorkerSample {
        cgroup: Arc::clone(&w.cgroup),
        pid: w.main.map(|m| m.pid),
        uptime_s: w.main.map(|m| uptime_s(m.start_ticks, cur.clk_tck, cur.boottime_s)),
        processes: w.procs.len(),
        at_ns,
        totals,
        per_s,
        memory: w.memory,
        model: w.model.clone(),
        gpu: cur.gpu.as_ref().map(|g| worker_gpu(g, &w.procs)),
        pressure: pressure(was, w),
    }
}

/// A worker's cumulative counters in `r`, and the CLOCK_MONOTONIC ns they describe: each
/// from the probes, from its fallback file, or `None` where neither measures it.
fn counters(r: &Readings, w: &WorkerReadings) -> (u64, Counters<Option<u64>>) {
    let sources = &r.setup.sources;
    let probed = r.kernel.workers.get(&w.cgroup.id);
    // With the process-count map full, a worker without an entry may have had its events
    // dropped: its counts are unknown, not zero.
    let counted = r.kernel.stats.workers_full == 0 || probed.is_some_and(|p| p.processes_counted);
    let io = w.process_io;
    let fallback = Counters {
        cpu_ns: w.cpu_stat.map(|(_, ns)| ns),
        syscall_read_bytes: io.map(|io| io.rchar),
        syscall_write_bytes: io.map(|io| io.wchar),
        storage_read_bytes: io.map(|io| io.read_bytes),
        storage_write_bytes: io.map(|io| io.write_bytes),
        ..Default::default()
    };
    // A worker the probes have nothing of has had no task counted: zero.
    let kernel = probed.map(|p| p.counters).unwrap_or_default();
    let totals =
        FIGURES.zip(kernel.zip(fallback)).map(|(figure, (kernel, fallback))| match sources.of(figure) {
            Source::Ebpf => match figure {
                Figure::ProcessesForked | Figure::Execs | Figure::ProcessesExited => {
                    counted.then_some(kernel)
                }
                _ => Some(kernel),
            },
            Source::Unavailable => None,
            _ => fallback,
        });
    let at_ns = match w.cpu_stat {
        Some((at_ns, _)) if sources.cpu == Source::Cgroup => at_ns,
        _ => probed.map_or(r.kernel.at_ns, |p| p.at_ns),
    };
    (at_ns, totals)
}

/// A worker's pressure stalls now, with their share of the time since its last reading.
fn pressure(was: Option<&WorkerReadings>, w: &WorkerReadings) -> [Option<StallFigures>; 3] {
    std::array::from_fn(|i| {
        let cur = w.pressure[i]?;
        let prev = was.and_then(|p| Some((p.pressure_at_ns, p.pressure[i]?)));
        let interval = prev.map_or(0, |(t, _)| w.pressure_at_ns.saturating_sub(t));
        // The kernel timestamps its totals when the file is read, a few µs before
        // `pressure_at_ns`: a stall of the whole interval may come out a hair over 100.
        let pct = |prev: Option<u64>, cur: Option<u64>| rate_pct(prev?, cur?, interval).map(|p| p.min(100.0));
        Some(StallFigures {
            some_ns: cur.some_ns,
            full_ns: cur.full_ns,
            some_pct: pct(prev.and_then(|(_, p)| p.some_ns), cur.some_ns),
            full_pct: pct(prev.and_then(|(_, p)| p.full_ns), cur.full_ns),
        })
    })
}

/// Host CPU over the interval, and memory now.
fn host(prev: &HostReadings, cur: &HostReadings) -> HostSample {
    let cpu_pct = match (prev.cpu, cur.cpu) {
        (Some(a), Some(b)) if b.total > a.total => {
            Some(b.busy.saturating_sub(a.busy) as f64 * 100.0 / (b.total - a.total) as f64)
        }
        _ => None,
    };
    HostSample {
        cpu_pct,
        ram_total: cur.memory.map(|m| m.0),
        ram_available: cur.memory.map(|m| m.1),
        model_dir_disk: cur.model_dir_disk,
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

/// Percent of one unit over an interval: Δ`value` ns per Δwall ns × 100.
pub fn rate_pct(prev_ns: u64, cur_ns: u64, interval_ns: u64) -> Option<f64> {
    (interval_ns > 0).then(|| cur_ns.saturating_sub(prev_ns) as f64 * 100.0 / interval_ns as f64)
}

/// Δ`value` per second over an interval of `interval_ns`.
pub fn per_second(prev: u64, cur: u64, interval_ns: u64) -> Option<f64> {
    rate_pct(prev, cur, interval_ns).map(|pct| pct * 1e7)
}

fn uptime_s(start_ticks: u64, clk_tck: u64, boottime_s: f64) -> u64 {
    (boottime_s - start_ticks as f64 / clk_tck as f64).max(0.0) as u64
}

#[cfg(test)]
mod tests {
    use monitor_common::ProbeStats;

    use super::*;
    use crate::{
        probes::{WorkerCounters, WorkerReading},
        sources::pressure::Stall,
    };

    const S: u64 = 1_000_000_000;

    fn setup(sources: FigureSources) -> Arc<Setup> {
        Arc::new(Setup { sources, missing: BTreeMap::new(), programs: Vec::new(), gpu: Source::Unavailable })
    }

    fn probed() -> FigureSources {
        let e = Source::Ebpf;
        FigureSources {
            cpu: e,
            runq: e,
            ctx_switches: e,
            io_syscall: e,
            io_read: e,
            io_write: e,
            processes_forked: e,
            execs: e,
            processes_exited: e,
        }
    }

    fn no_bpf() -> FigureSources {
        FigureSources::new(&Availability::none("no BPF"))
    }

    fn cgroup(id: u64) -> Arc<WorkerCgroup> {
        Arc::new(WorkerCgroup {
            group: "llm".into(),
            instance: format!("w{id}").into(),
            dir: format!("/sys/fs/cgroup/rbee.slice/llm/w{id}").into(),
            path: format!("/rbee.slice/llm/w{id}").into(),
            id,
        })
    }

    fn files(id: u64, at_ns: u64) -> WorkerReadings {
        WorkerReadings {
            cgroup: cgroup(id),
            procs: vec![100 + id as u32],
            main: Some(MainProcess { pid: 100 + id as u32, start_ticks: 1_000 }),
            cpu_stat: None,
            process_io: None,
            memory: None,
            model: None,
            pressure_at_ns: at_ns,
            pressure: [None; 3],
        }
    }

    fn readings(seq: u64, at_ns: u64, sources: FigureSources) -> Readings {
        Readings {
            setup: setup(sources),
            seq,
            wall: SystemTime::UNIX_EPOCH,
            kernel: KernelReading { at_ns, ..Default::default() },
            workers: Vec::new(),
            host: HostReadings::default(),
            own_cpu_ns: None,
            own_rss_bytes: None,
            gpu: None,
            boottime_s: 100.0,
            clk_tck: 100,
        }
    }

    /// Worker `id` in `r`, with counters from the probes, as of the pass.
    fn with_worker(mut r: Readings, id: u64, counters: WorkerCounters, counted: bool) -> Readings {
        let at_ns = r.kernel.at_ns;
        r.kernel.workers.insert(id, WorkerReading { at_ns, counters, processes_counted: counted });
        r.workers.push(files(id, at_ns));
        r
    }

    fn busy(cpu_ns: u64, forked: u64) -> WorkerCounters {
        Counters {
            cpu_ns,
            runq_wait_ns: cpu_ns / 4,
            syscall_write_bytes: cpu_ns * 2,
            processes_forked: forked,
            ..Default::default()
        }
    }

    #[test]
    fn rates_are_growth_over_each_worker_s_interval() {
        let prev = with_worker(readings(1, S, probed()), 7, busy(S, 1), true);
        let cur = with_worker(readings(2, 3 * S, probed()), 7, busy(2 * S, 3), true);
        let s = Sample::new(&prev, &cur);
        let w = &s.workers[0];
        assert_eq!(s.interval_ns, 2 * S);
        assert_eq!(w.cpu_pct(), Some(50.0));
        assert_eq!(w.runq_wait_pct(), Some(12.5));
        assert_eq!(w.per_s.syscall_write_bytes, Some(1e9));
        assert_eq!(w.per_s.processes_forked, Some(1.0));
        assert_eq!(w.totals.cpu_ns, Some(2 * S));
        assert_eq!(w.totals.execs, Some(0));
        assert_eq!(w.uptime_s, Some(90));
    }

    #[test]
    fn a_new_worker_counts_from_zero_at_the_previous_pass() {
        let prev = readings(1, S, probed());
        let cur = with_worker(readings(2, 2 * S, probed()), 7, busy(S / 2, 2), true);
        let w = &Sample::new(&prev, &cur).workers[0];
        assert_eq!(w.cpu_pct(), Some(50.0));
        assert_eq!(w.totals.processes_forked, Some(2));
    }

    #[test]
    fn a_worker_missing_from_a_full_map_has_null_process_totals_and_rates() {
        let mut prev = with_worker(readings(1, S, probed()), 7, busy(S, 0), false);
        let mut cur = with_worker(readings(2, 2 * S, probed()), 7, busy(2 * S, 0), false);
        prev.kernel.stats = ProbeStats { workers_full: 1, ..Default::default() };
        cur.kernel.stats = prev.kernel.stats;
        let w = &Sample::new(&prev, &cur).workers[0];
        let processes = [w.totals.processes_forked, w.totals.execs, w.totals.processes_exited];
        assert_eq!(processes, [None; 3], "unknown, not zero");
        let rates = [w.per_s.processes_forked, w.per_s.execs, w.per_s.processes_exited];
        assert_eq!(rates, [None; 3]);
        // The iterator measures the rest, whatever the map holds.
        assert_eq!(w.totals.cpu_ns, Some(2 * S));
        assert_eq!(w.cpu_pct(), Some(100.0));
        assert_eq!(w.totals.voluntary_switches, Some(0));
    }

    #[test]
    fn a_worker_the_probes_have_nothing_of_is_zero_unless_the_map_is_full() {
        let prev = readings(1, S, probed());
        let mut cur = readings(2, 2 * S, probed());
        cur.workers.push(files(9, 2 * S));
        let w = &Sample::new(&prev, &cur).workers[0];
        assert_eq!((w.totals.cpu_ns, w.totals.processes_forked), (Some(0), Some(0)));
        cur.kernel.stats.workers_full = 3;
        let w = &Sample::new(&prev, &cur).workers[0];
        assert_eq!((w.totals.cpu_ns, w.totals.processes_forked), (Some(0), None));
    }

    #[test]
    fn unmeasured_figures_are_null_and_fallbacks_fill_in() {
        let mut prev = readings(1, S, no_bpf());
        let mut cur = readings(2, 3 * S, no_bpf());
        let mut was = files(7, S);
        was.cpu_stat = Some((S + 10, 4 * S));
        was.process_io = Some(ProcessIo { rchar: 100, wchar: 0, read_bytes: 0, write_bytes: 4096 });
        let mut now = files(7, 3 * S);
        now.cpu_stat = Some((3 * S + 10, 5 * S));
        now.process_io = Some(ProcessIo { rchar: 300, wchar: 50, read_bytes: 0, write_bytes: 8192 });
        (prev.workers, cur.workers) = (vec![was], vec![now]);
        let w = &Sample::new(&prev, &cur).workers[0];
        assert_eq!(w.cpu_pct(), Some(50.0), "cpu.stat, over the time between its reads");
        assert_eq!(w.at_ns, 3 * S + 10);
        assert_eq!(w.totals.syscall_read_bytes, Some(300));
        assert_eq!(w.per_s.storage_write_bytes, Some(2048.0));
        assert_eq!(w.runq_wait_pct(), None);
        assert_eq!(
            [w.totals.runq_wait_ns, w.totals.voluntary_switches, w.totals.processes_forked],
            [None; 3]
        );
    }

    #[test]
    fn a_fallback_unread_at_either_end_gives_no_rate() {
        let mut prev = readings(1, S, no_bpf());
        let mut cur = readings(2, 2 * S, no_bpf());
        let mut now = files(7, 2 * S);
        now.cpu_stat = Some((2 * S, 5 * S));
        (prev.workers, cur.workers) = (vec![files(7, S)], vec![now]);
        let w = &Sample::new(&prev, &cur).workers[0];
        assert_eq!((w.totals.cpu_ns, w.cpu_pct()), (Some(5 * S), None), "its growth spans two intervals");
        assert_eq!((w.totals.syscall_read_bytes, w.per_s.syscall_read_bytes), (None, None));
    }

    #[test]
    fn pressure_share_of_the_interval() {
        let stall = |some_us: u64| Some(Stall { some_ns: Some(some_us * 1000), full_ns: None });
        let mut was = files(7, S);
        was.pressure = [stall(0), None, stall(10)];
        let mut now = files(7, 2 * S);
        now.pressure = [stall(250_000), stall(5), stall(2_000_000)];
        let (mut prev, mut cur) = (readings(1, S, probed()), readings(2, 2 * S, probed()));
        (prev.workers, cur.workers) = (vec![was], vec![now]);
        let [cpu, memory, io] = Sample::new(&prev, &cur).workers[0].pressure;
        let cpu = cpu.unwrap();
        assert_eq!((cpu.some_ns, cpu.some_pct, cpu.full_pct), (Some(250_000_000), Some(25.0), None));
        assert_eq!(memory.unwrap().some_pct, None, "no previous reading");
        assert_eq!(io.unwrap().some_pct, Some(100.0), "clamped to the interval");
    }

    #[test]
    fn host_and_own_figures() {
        let (mut prev, mut cur) = (readings(1, S, probed()), readings(2, 2 * S, probed()));
        prev.host.cpu = Some(HostCpu { busy: 100, total: 1_000 });
        cur.host = HostReadings {
            cpu: Some(HostCpu { busy: 150, total: 1_200 }),
            memory: Some((8 << 30, 2 << 30)),
            model_dir_disk: None,
        };
        (prev.own_cpu_ns, cur.own_cpu_ns, cur.own_rss_bytes) = (Some(S), Some(S + 5_000_000), Some(1 << 20));
        cur.kernel.kernel_ns = 1_000;
        let s = Sample::new(&prev, &cur);
        assert_eq!(s.host.cpu_pct, Some(25.0));
        assert_eq!((s.host.ram_total, s.host.ram_available), (Some(8 << 30), Some(2 << 30)));
        assert_eq!(s.self_cost, SelfCost { cpu_s: 0.005, kernel_s: 1e-6, rss_bytes: 1 << 20 });
        prev.host.cpu = None;
        assert_eq!(Sample::new(&prev, &cur).host.cpu_pct, None);
    }

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
    fn uptime_counts_from_start() {
        assert_eq!(uptime_s(1000, 100, 70.5), 60);
        assert_eq!(uptime_s(1000, 100, 5.0), 0, "clock skew never gives a negative uptime");
    }
}
