//! The records the eBPF program and its loader share. Everything here is `#[repr(C)]`, plain
//! old data, and laid out without implicit padding, so both sides agree byte for byte.
#![no_std]

/// Workers (cgroups `<slice>/<group>/<instance>`) the kernel keeps counters for at once.
/// A worker beyond this is not counted and `ProbeStats::workers_full` says so.
pub const MAX_WORKERS: u32 = 4096;

/// Cumulative counters of one worker, kept per CPU by the kernel and summed by the loader.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerCounters {
    /// Nanoseconds the kernel charged to the worker's tasks (`sched_stat_runtime`).
    pub cpu_ns: u64,
    /// Nanoseconds the worker's tasks spent runnable but not running: the kernel's own
    /// `sched_info.run_delay` (`/proc/<pid>/schedstat`), summed as it grows.
    pub runq_wait_ns: u64,
    /// Times the worker's tasks got a CPU (`sched_info.pcount`).
    pub runq_waits: u64,
    /// Switches where the task gave up the CPU itself (blocked).
    pub voluntary_switches: u64,
    /// Switches where the task was preempted or yielded while runnable.
    pub involuntary_switches: u64,
    /// Bytes the worker's tasks asked to read and got, through read-type system calls
    /// (`/proc/<pid>/io` `rchar` semantics).
    pub syscall_read_bytes: u64,
    /// Bytes written through write-type system calls (`wchar` semantics).
    pub syscall_write_bytes: u64,
    /// Bytes of read requests the worker's tasks submitted to block devices (`read_bytes`
    /// semantics): page-cache misses, readahead, page faults on mapped files, direct I/O.
    pub storage_read_bytes: u64,
    /// Bytes the worker will have written to storage (`write_bytes` semantics): page-cache
    /// pages it dirtied on file systems that write back (counted when dirtied, as the kernel
    /// does, not when the flusher writes them) plus direct writes it submitted.
    pub storage_write_bytes: u64,
    /// Processes (not threads) the worker's tasks forked, that ran a new program, and that
    /// exited (their last thread).
    pub processes_forked: u64,
    pub execs: u64,
    pub processes_exited: u64,
    /// Per CPU only: while a task of the worker is on this CPU, `bpf_ktime_get_ns()`
    /// (CLOCK_MONOTONIC) when the kernel last charged it or switched it in, else 0. The loader
    /// adds `now - running_since_ns`, the time accrued but not yet charged. It sits in the same
    /// per-CPU slot as `cpu_ns` and both change under that CPU's run-queue lock, so one map
    /// lookup reads them consistently.
    pub running_since_ns: u64,
}

/// The task a CPU switched to last, and its worker (0: none); a per-CPU cache that spares
/// the probes classifying the same task again. Valid while the task's `css_set` is the one
/// recorded: moving to another cgroup gives the task a new one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CurrentTask {
    /// Kernel address of the task; identity only.
    pub task: u64,
    /// Kernel address of its `css_set` when classified.
    pub css_set: u64,
    pub worker: u64,
    /// The task's `sched_info.run_delay` and `pcount` as last added to its worker's
    /// counters (for a worker's task); the growth since is its wait for this CPU. A task is
    /// switched in and out on the same CPU, so a per-CPU slot is all the state it needs.
    pub run_delay: u64,
    pub pcount: u64,
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

/// The system calls whose bytes count as read, as written, or as both (sendfile,
/// copy_file_range), by number on this architecture; unused slots hold `u32::MAX`. Handed in
/// by the loader, which knows the architecture's numbers.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoSyscalls {
    pub read: [u32; 5],
    pub write: [u32; 5],
    pub both: [u32; 2],
}

/// Cgroup levels below a worker whose tasks still count for it; a task deeper than this is
/// not counted and `ProbeStats::too_deep` says so.
pub const MAX_NESTING: u32 = 16;

/// Bytes of the ring buffer lifecycle events go through to the loader.
pub const EVENTS_BYTES: u32 = 256 * 1024;

/// What happened to a worker's process.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskEventKind {
    Fork = 1,
    Exec = 2,
    Exit = 3,
}

/// A process of a worker forked, ran a new program, or exited.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskEvent {
    /// The worker's cgroup id.
    pub worker: u64,
    /// CLOCK_MONOTONIC ns.
    pub at_ns: u64,
    /// A `TaskEventKind`.
    pub kind: u32,
    /// The process (thread group id): the child for a fork.
    pub pid: u32,
    /// For a fork, the parent process; else 0.
    pub parent: u32,
    pub _pad: u32,
}

/// Failures the probes count instead of losing silently.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeStats {
    /// Events for a worker that had no room in the `WORKERS` map.
    pub workers_full: u64,
    /// Kernel pointers found NULL where a task or cgroup should be (torn down under us).
    pub read_errors: u64,
    /// Events of tasks nested more than `MAX_NESTING` cgroup levels below their worker.
    pub too_deep: u64,
    /// Lifecycle events dropped because the ring buffer was full (their counts in
    /// `WorkerCounters` are still exact).
    pub events_lost: u64,
}

/// Byte offsets of the kernel struct fields the probes read, the positions of the tracepoint
/// arguments they use, and the slice's depth. Rust eBPF gets no CO-RE relocations, so the
/// loader resolves these from the running kernel's BTF and hands them in as a read-only
/// global: the verifier then knows each as a constant, which lets the probes load kernel
/// fields directly (BTF-typed pointers) instead of calling `bpf_probe_read_kernel`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelLayout {
    /// `task_struct.pid`
    pub task_pid: u32,
    /// `task_struct.cgroups` (`struct css_set *`)
    pub task_cgroups: u32,
    /// The CPU a task is on: `task_struct.thread_info.cpu` or `task_struct.cpu`.
    pub task_cpu: u32,
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
    /// `sched_switch(bool preempt, task *prev, task *next, unsigned int prev_state)`
    pub switch_preempt: u32,
    pub switch_prev: u32,
    pub switch_next: u32,
    pub switch_prev_state: u32,
    /// `sched_stat_runtime(task *p, u64 runtime)`
    pub runtime_task: u32,
    pub runtime_delta: u32,
    /// `task_struct.sched_info.run_delay`, `.pcount` and `.last_queued`
    pub task_run_delay: u32,
    pub task_pcount: u32,
    pub task_last_queued: u32,
    /// `task_struct.se.cfs_rq`, `cfs_rq.rq` and `rq.clock`: the clock of the run queue a
    /// task is on, which the kernel's run-queue wait is measured with.
    pub task_cfs_rq: u32,
    pub cfs_rq_rq: u32,
    pub rq_clock: u32,
    /// `task_struct.tgid`
    pub task_tgid: u32,
    /// `sched_process_fork(task *parent, task *child)`
    pub fork_parent: u32,
    pub fork_child: u32,
    /// `sched_process_exec(task *p, pid_t old_pid, struct linux_binprm *bprm)`
    pub exec_task: u32,
    /// `sched_process_exit(task *p[, bool group_dead])`; `group_dead` is `u32::MAX` on
    /// kernels without it (before 6.16), where the thread group leader's exit stands in.
    pub exit_task: u32,
    pub exit_group_dead: u32,
    /// `sys_exit(struct pt_regs *regs, long ret)`
    pub sys_exit_regs: u32,
    pub sys_exit_ret: u32,
    /// The system call number in `pt_regs` (`orig_ax` on x86-64).
    pub pt_regs_syscall_nr: u32,
    /// `block_bio_queue(struct bio *bio)`
    pub bio_queue_bio: u32,
    /// `bio.bi_opf` (operation in the low byte) and `bio.bi_iter.bi_size`
    pub bio_opf: u32,
    pub bio_size: u32,
    /// `bio.bi_vcnt`, `bio.bi_io_vec` and `bio_vec.bv_page`: the first page a bio carries.
    pub bio_vcnt: u32,
    pub bio_io_vec: u32,
    pub bio_vec_page: u32,
    /// `task_struct.bio_list`: set while a block driver resubmits bios on the task's behalf.
    pub task_bio_list: u32,
    /// `page.flags` (also `folio.flags`) and `page.compound_head` (bit 0: a tail page).
    pub page_flags: u32,
    pub page_compound_head: u32,
    /// Bit numbers in `page.flags`: `PG_writeback` and `PG_head` (a large folio).
    pub pg_writeback: u32,
    pub pg_head: u32,
    /// `folio._nr_pages`, the page count of a large folio.
    pub folio_nr_pages: u32,
    /// `writeback_dirty_folio(struct folio *folio, struct address_space *mapping)`
    pub dirty_folio: u32,
    pub dirty_mapping: u32,
    /// `address_space.host`, `inode.i_sb`, `super_block.s_bdi`, `super_block.s_magic` and
    /// `backing_dev_info.capabilities`: whether dirtied pages will be written back.
    pub mapping_host: u32,
    pub inode_sb: u32,
    pub sb_bdi: u32,
    pub sb_magic: u32,
    pub bdi_capabilities: u32,
    /// Bytes per page.
    pub page_size: u32,
    /// Depth of the slice below the cgroup2 root (`rbee.slice` = 1); workers are two deeper.
    pub slice_level: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type is repr(C), Copy, has no padding and is valid for any bit pattern.
    unsafe impl aya::Pod for super::WorkerCounters {}
    unsafe impl aya::Pod for super::CurrentTask {}
    unsafe impl aya::Pod for super::SliceFilter {}
    unsafe impl aya::Pod for super::ProbeStats {}
    unsafe impl aya::Pod for super::KernelLayout {}
    unsafe impl aya::Pod for super::IoSyscalls {}
    unsafe impl aya::Pod for super::TaskEvent {}
}
