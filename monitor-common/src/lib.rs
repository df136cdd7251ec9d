//! The records the eBPF program and its loader share. Everything here is `#[repr(C)]`, plain
//! old data, and laid out without implicit padding, so both sides agree byte for byte.
#![no_std]

/// The names the loader finds the object's parts by. The eBPF side declares each as a Rust
/// item of that name (a map `static`, a program `fn`, the `LAYOUT` global); a test in the
/// loader parses the embedded object and finds every one, so a rename fails the tests, not
/// a load on a user's host.
pub mod names {
    pub const MAP_WORKERS: &str = "WORKERS";
    pub const MAP_SLICE: &str = "SLICE";
    pub const MAP_CLOCK: &str = "CLOCK";
    pub const MAP_EVENTS: &str = "EVENTS";
    pub const MAP_STATS: &str = "STATS";
    pub const MAP_CPU_BASE: &str = "CPU_BASE";
    pub const MAP_CPU_OFFSETS: &str = "CPU_OFFSETS";
    pub const MAPS: [&str; 7] =
        [MAP_WORKERS, MAP_SLICE, MAP_CLOCK, MAP_EVENTS, MAP_STATS, MAP_CPU_BASE, MAP_CPU_OFFSETS];

    /// The task iterator and the lifecycle tracepoints.
    pub const TASK_COUNTERS: &str = "task_counters";
    pub const FORK: &str = "sched_process_fork";
    pub const EXEC: &str = "sched_process_exec";
    pub const EXIT: &str = "sched_process_exit";
    pub const FREE: &str = "sched_process_free";
    pub const ATTACH: &str = "cgroup_attach_task";
    pub const PROGRAMS: [&str; 6] = [TASK_COUNTERS, FORK, EXEC, EXIT, FREE, ATTACH];

    /// The read-only global holding the `KernelLayout`.
    pub const GLOBAL_LAYOUT: &str = "LAYOUT";
}

/// Workers (cgroups `<slice>/<group>/<instance>`) the kernel keeps counters for at once.
/// A worker beyond this is not counted and `ProbeStats::workers_full` says so.
pub const MAX_WORKERS: u32 = 4096;

/// A task's own cumulative counters, as the kernel keeps them in its `task_struct`: the
/// figures `/proc/<pid>/task/<tid>/schedstat`, `status` and `io` print. The probes copy them;
/// the loader turns their growth into per-worker totals.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskCounters {
    /// `se.sum_exec_runtime`, plus, for a task on a CPU right now, the time it has run since
    /// the scheduler last charged it.
    pub cpu_ns: u64,
    /// `sched_info.run_delay` and `sched_info.pcount`: time spent runnable but waiting, and
    /// times it got a CPU.
    pub run_delay_ns: u64,
    pub pcount: u64,
    /// `nvcsw`, `nivcsw`: voluntary and involuntary context switches.
    pub nvcsw: u64,
    pub nivcsw: u64,
    /// `ioac.rchar`, `ioac.wchar`: bytes through read- and write-type system calls.
    pub rchar: u64,
    pub wchar: u64,
    /// `ioac.read_bytes`, `ioac.write_bytes`: bytes the task made storage read, and bytes it
    /// dirtied in the page cache or wrote directly.
    pub read_bytes: u64,
    pub write_bytes: u64,
}

/// One task of a worker and its counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskRecord {
    /// The worker's cgroup id.
    pub worker: u64,
    /// `task_struct.start_time`, CLOCK_MONOTONIC ns: with `tid`, the task's identity.
    pub start_ns: u64,
    pub tid: u32,
    /// Thread group id (the process).
    pub tgid: u32,
    /// `TASK_EXITING` when the task has begun to exit (a zombie, or on its way).
    pub flags: u32,
    pub _pad: u32,
    pub counters: TaskCounters,
}

/// `TaskRecord::flags`: `PF_EXITING` was set.
pub const TASK_EXITING: u32 = 1;
/// `TaskRecord::flags`: the task may be stalled, and count in its cgroup's pressure: it is
/// queued to run, or in an uninterruptible sleep (I/O, memory), or its state is unknown on
/// this kernel.
pub const TASK_MAY_STALL: u32 = 2;

/// `TaskRecord::flags`: the record is a process's (its thread group leader's), and the
/// iterator read the process's resident memory (`IterRecord::memory`).
pub const TASK_HAS_MEMORY: u32 = 4;
/// `TaskRecord::flags`: the record is a process's, and its memory could not be read (its
/// worker's memory is then read from `/proc`).
pub const TASK_MEMORY_UNREADABLE: u32 = 8;

/// A process's resident pages by kind, as its `mm_struct.rss_stat` counts them: the figures
/// `/proc/<pid>/statm` and `status` print (`RssFile`, `RssAnon`, `RssShmem`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessMemory {
    pub file_pages: u64,
    pub anon_pages: u64,
    pub shmem_pages: u64,
}

/// `TaskRecord::flags`: the record is a process's, and the iterator read the counters of
/// the memory cgroup the process is charged to (`IterRecord::memory_cgroup`).
pub const TASK_HAS_MEMORY_CGROUP: u32 = 16;

/// The memory cgroup a process is charged to, and that cgroup's own counters: the figures
/// its `memory.current`, `.peak`, `.max` and `memory.events` `oom_kill` print (v1:
/// `memory.usage_in_bytes`, `.max_usage_in_bytes`, `.limit_in_bytes`, `memory.oom_control`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupMemory {
    /// The cgroup's id: its directory's inode number, in whichever hierarchy holds the
    /// memory controller.
    pub id: u64,
    /// `page_counter` `usage`, `watermark` and `max`, pages.
    pub usage_pages: u64,
    pub watermark_pages: u64,
    pub max_pages: u64,
    /// `memory_events[MEMCG_OOM_KILL]`.
    pub oom_kills: u64,
}

/// What the task iterator writes for each task of a worker: its record and, for a thread
/// group leader, its process's memory (`TASK_HAS_MEMORY`) and its memory cgroup's counters
/// (`TASK_HAS_MEMORY_CGROUP`); zeroes otherwise.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IterRecord {
    pub task: TaskRecord,
    pub memory: ProcessMemory,
    pub memory_cgroup: CgroupMemory,
}

const _: () = assert!(core::mem::size_of::<TaskCounters>() == 72);
const _: () = assert!(core::mem::size_of::<TaskRecord>() == 104);
const _: () = assert!(core::mem::size_of::<ProcessMemory>() == 24);
const _: () = assert!(core::mem::size_of::<CgroupMemory>() == 40);
const _: () = assert!(core::mem::size_of::<IterRecord>() == 168);

/// Process counts of one worker, kept per CPU by the lifecycle probes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessCounts {
    /// Processes (not threads) the worker's tasks forked, that ran a new program, and that
    /// exited (their last thread).
    pub forked: u64,
    pub execs: u64,
    pub exited: u64,
}

/// The offset `CLOCK_MONOTONIC − sched_clock` the task iterator measured last, so the exit
/// probe can tell how long a running task has gone uncharged. 0 until the first iteration.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClockOffset {
    pub monotonic_minus_sched_ns: u64,
}

/// The watched slice. Kept in a one-entry array map so the loader can set it when the slice
/// appears (or re-appears with a new id) without reloading the program. Its depth is fixed
/// for the program's life and is a load-time constant (`KernelLayout::slice_level`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SliceFilter {
    /// v2 cgroup id (inode number) of the slice directory; 0 = no slice yet, count nothing.
    pub id: u64,
}

/// Cgroup levels below a worker whose tasks still count for it; a task deeper than this is
/// not counted and `ProbeStats::too_deep` says so.
pub const MAX_NESTING: u32 = 16;

/// Bytes of the ring buffer lifecycle events go through to the loader: room for about
/// 8 000 task exits per interval, each of which sends two events.
pub const EVENTS_BYTES: u32 = 2 * 1024 * 1024;

/// What happened to a worker's task.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskEventKind {
    /// A process forked a new process (not a thread); `task` is the child.
    Fork = 1,
    /// A process ran a new program.
    Exec = 2,
    /// A task began to exit; its counters as of then. `EXIT_PROCESS` is set when it is the
    /// process's last thread.
    Exit = 3,
    /// A task is gone (freed after its last switch); its final counters.
    Free = 4,
    /// A task moved to another cgroup; its counters as of then, and the worker it is in now
    /// (0: none).
    Moved = 5,
}

/// `TaskEvent::flags`: the exiting task was its process's last.
pub const EXIT_PROCESS: u32 = 1;

/// An event about one of a worker's tasks.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskEvent {
    /// A `TaskEventKind`.
    pub kind: u32,
    pub flags: u32,
    /// For a fork, the parent process; else 0.
    pub parent: u32,
    pub _pad: u32,
    /// CLOCK_MONOTONIC ns.
    pub at_ns: u64,
    pub task: TaskRecord,
}

const _: () = assert!(core::mem::size_of::<TaskEvent>() == 128);

/// Failures the probes count instead of losing silently.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeStats {
    /// Process events of a worker that had no room in the `WORKERS` map.
    pub workers_full: u64,
    /// Kernel pointers found NULL where a task or cgroup should be (torn down under us).
    pub read_errors: u64,
    /// Tasks nested more than `MAX_NESTING` cgroup levels below their worker.
    pub too_deep: u64,
    /// Events dropped because the ring buffer was full. Process counts stay exact; the
    /// counters a dropped exit carried are lost.
    pub events_lost: u64,
}

/// A `KernelLayout` offset for a member this kernel does not have: the probes then leave the
/// figure it feeds at 0 and the loader reports that figure as unavailable.
pub const MISSING: u32 = u32::MAX;

/// Byte offsets of the kernel struct members the probes read, the positions of the tracepoint
/// arguments they use, and the slice's depth. Rust eBPF gets no CO-RE relocations, so the
/// loader resolves these from the running kernel's BTF (trying each name a member has had
/// across kernel versions) and hands them in as a read-only global: the verifier then knows
/// each as a constant, which lets the probes load kernel fields directly (BTF-typed
/// pointers) and skip the reads of `MISSING` members without verifying them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelLayout {
    /// `task_struct.pid`, `.tgid`, `.cgroups` (`struct css_set *`), `.start_time`, `.flags`.
    pub task_pid: u32,
    pub task_tgid: u32,
    pub task_cgroups: u32,
    pub task_start_time: u32,
    pub task_flags: u32,
    /// `task_struct.__state` (`state`, a long, before 5.14; read as its low 32 bits) and
    /// `.on_rq` (an int, a u8 from 7.0; read as its low byte): whether the task may stall.
    pub task_state: u32,
    pub task_on_rq: u32,
    /// `css_set.dfl_cgrp` (`struct cgroup *`, the v2 cgroup)
    pub css_set_dfl_cgrp: u32,
    /// `cgroup.level`
    pub cgroup_level: u32,
    /// `cgroup.kn` (`struct kernfs_node *`)
    pub cgroup_kn: u32,
    /// `kernfs_node.id`, the cgroup id
    pub kernfs_node_id: u32,
    /// `kernfs_node.__parent` (`parent` before Linux 6.15)
    pub kernfs_node_parent: u32,
    /// `task_struct.se.sum_exec_runtime`: the CPU time the scheduler charged the task.
    pub task_sum_exec_runtime: u32,
    /// For the time a running task has not been charged yet: `task_struct.on_cpu` (an int,
    /// a u8 from 7.0; read as its low byte), `se.exec_start`, `se.cfs_rq`, `cfs_rq.rq`,
    /// and `rq.clock` and `rq.clock_task`.
    pub task_on_cpu: u32,
    pub task_exec_start: u32,
    pub task_cfs_rq: u32,
    pub cfs_rq_rq: u32,
    pub rq_clock: u32,
    pub rq_clock_task: u32,
    /// `task_struct.sched_info.run_delay` and `.pcount`
    pub task_run_delay: u32,
    pub task_pcount: u32,
    /// `task_struct.nvcsw` and `.nivcsw`
    pub task_nvcsw: u32,
    pub task_nivcsw: u32,
    /// `task_struct.ioac.rchar`, `.wchar`, `.read_bytes`, `.write_bytes`
    pub task_rchar: u32,
    pub task_wchar: u32,
    pub task_read_bytes: u32,
    pub task_write_bytes: u32,
    /// `bpf_iter__task.meta` and `.task`: the task iterator's context.
    pub iter_meta: u32,
    pub iter_task: u32,
    /// `sched_process_fork(task *parent, task *child)`
    pub fork_parent: u32,
    pub fork_child: u32,
    /// `sched_process_exec(task *p, pid_t old_pid, struct linux_binprm *bprm)`
    pub exec_task: u32,
    /// `sched_process_exit(task *p[, bool group_dead])`; `group_dead` is `MISSING` on
    /// kernels without it (before 6.16), where the thread group leader's exit stands in.
    pub exit_task: u32,
    pub exit_group_dead: u32,
    /// `sched_process_free(task *p)`
    pub free_task: u32,
    /// `cgroup_attach_task(cgroup *dst, const char *path, task *task, bool threadgroup)`
    pub attach_task: u32,
    /// Depth of the slice below the cgroup2 root (`rbee.slice` = 1); workers are two deeper.
    pub slice_level: u32,
    /// `task_struct.mm` and `mm_struct.rss_stat`, the process's resident page counters,
    /// indexed by `MM_FILEPAGES`, `MM_ANONPAGES`, `MM_SHMEMPAGES`.
    pub task_mm: u32,
    pub mm_rss_stat: u32,
    /// Bytes from one of those counters to the next: an `atomic_long_t` before 6.2, a
    /// `struct percpu_counter` from 6.2.
    pub rss_counter_size: u32,
    /// Where a counter's value is in it: `percpu_counter.count` (0 for the atomic).
    pub rss_counter_count: u32,
    /// `percpu_counter.counters`, the per-CPU parts not yet folded into `count` (from 6.2;
    /// `MISSING` before). `statm` adds them from 6.16 (and on stable kernels that took that
    /// fix, such as Debian's 6.12); the probes always do, for the exact figure.
    pub rss_counter_percpu: u32,
    /// `nr_cpu_ids`, the CPUs the per-CPU parts are summed over.
    pub nr_cpus: u32,
    /// `bpf_array.pptrs`: where a per-CPU array map keeps its slots' per-CPU pointers, from
    /// which the iterator finds each CPU's per-CPU offset.
    pub bpf_array_pptrs: u32,
    /// `css_set.subsys[memory_cgrp_id]`: the memory controller's state of a task's cgroups,
    /// the `struct mem_cgroup` (its `css` is its first member).
    pub css_set_memory: u32,
    /// `cgroup_subsys_state.cgroup`: the cgroup that state belongs to.
    pub css_cgroup: u32,
    /// `mem_cgroup.memory.usage`, `.watermark`, `.max` (a `struct page_counter`), and
    /// `mem_cgroup.memory_events[MEMCG_OOM_KILL]`.
    pub memcg_usage: u32,
    pub memcg_watermark: u32,
    pub memcg_max: u32,
    pub memcg_oom_kills: u32,
}

/// `mm_struct.rss_stat` indices (`enum { MM_FILEPAGES, MM_ANONPAGES, MM_SWAPENTS,
/// MM_SHMEMPAGES }`, unchanged since 4.5).
pub const MM_FILEPAGES: u32 = 0;
pub const MM_ANONPAGES: u32 = 1;
pub const MM_SHMEMPAGES: u32 = 3;

/// CPUs the iterator sums per-CPU counter parts over at most (a bound for the verifier); a
/// host with more reads its processes' memory from `/proc` instead.
pub const MAX_CPUS: u32 = 1024;

const _: () = assert!(core::mem::size_of::<ProcessCounts>() == 24);
const _: () = assert!(core::mem::size_of::<ClockOffset>() == 8);
const _: () = assert!(core::mem::size_of::<SliceFilter>() == 8);
const _: () = assert!(core::mem::size_of::<ProbeStats>() == 32);
const _: () = assert!(core::mem::size_of::<KernelLayout>() == 50 * 4);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), Copy, no padding (the size assertions above), any bit pattern valid.
    unsafe impl aya::Pod for super::TaskCounters {}
    // SAFETY: as for TaskCounters.
    unsafe impl aya::Pod for super::TaskRecord {}
    // SAFETY: as for TaskCounters.
    unsafe impl aya::Pod for super::ProcessCounts {}
    // SAFETY: as for TaskCounters.
    unsafe impl aya::Pod for super::ClockOffset {}
    // SAFETY: as for TaskCounters.
    unsafe impl aya::Pod for super::SliceFilter {}
    // SAFETY: as for TaskCounters.
    unsafe impl aya::Pod for super::ProbeStats {}
    // SAFETY: as for TaskCounters.
    unsafe impl aya::Pod for super::KernelLayout {}
    // SAFETY: as for TaskCounters.
    unsafe impl aya::Pod for super::TaskEvent {}
    // SAFETY: as for TaskCounters.
    unsafe impl aya::Pod for super::IterRecord {}
    // SAFETY: as for TaskCounters.
    unsafe impl aya::Pod for super::CgroupMemory {}
}
