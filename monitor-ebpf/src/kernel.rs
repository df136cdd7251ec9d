//! Reading the kernel structures the probes need, at offsets the loader resolved from BTF.
//!
//! The programs' task arguments are BTF-typed pointers, so the verifier lets them load fields
//! directly (a plain load with a fault handler, far cheaper than a `bpf_probe_read_kernel`
//! call) as long as each offset is a known constant and matches a field of the right size.
//! The offsets come from `LAYOUT`, a frozen read-only global, which the verifier treats as
//! constants; a member the kernel lacks is `MISSING`, and its branch is never verified.
use aya_ebpf::helpers::{bpf_get_current_task, bpf_ktime_get_ns, bpf_probe_read_kernel};
use monitor_common::{
    KernelLayout, SliceFilter, TaskCounters, TaskRecord, MAX_NESTING, MISSING, TASK_EXITING,
};

use crate::maps::stats;

/// Filled in by the loader before the program is loaded (`EbpfLoader::override_global`).
#[unsafe(no_mangle)]
// SAFETY: KernelLayout is plain u32s, valid as all zeroes.
pub(crate) static LAYOUT: KernelLayout = unsafe { core::mem::zeroed() };

/// One field of `LAYOUT`; volatile so the compiler cannot fold the zero it was compiled with.
macro_rules! layout {
    ($field:ident) => {
        // SAFETY: LAYOUT is a plain static, valid to read at any time.
        unsafe { core::ptr::read_volatile(&raw const $crate::kernel::LAYOUT.$field) }
    };
}
pub(crate) use layout;

/// A kernel pointer the verifier knows by its BTF type: a program argument, or a pointer
/// member loaded from one. Only such pointers may be read with `field`.
#[derive(Clone, Copy)]
pub struct KernelPtr(u64);

impl KernelPtr {
    /// # Safety
    /// `p` must be a BTF-typed kernel pointer (see the type's documentation) or NULL.
    #[inline(always)]
    pub unsafe fn new(p: u64) -> Option<Self> {
        (p != 0).then_some(Self(p))
    }

    /// The field of type `T` at byte `off`.
    #[inline(always)]
    pub fn field<T: Copy>(self, off: u32) -> T {
        // SAFETY: the verifier checks the load against the pointer's BTF type at this
        // constant offset, and a fault on a torn-down object reads as zero.
        unsafe { core::ptr::read_volatile((self.0 as *const u8).add(off as usize).cast::<T>()) }
    }

    /// `field`, or 0 when this kernel lacks the member.
    #[inline(always)]
    pub fn field_or_zero(self, off: u32) -> u64 {
        if off == MISSING {
            0
        } else {
            self.field(off)
        }
    }

    /// A pointer member; `None` (and counted) when NULL, as for a task being torn down.
    #[inline(always)]
    pub fn pointer(self, off: u32) -> Option<KernelPtr> {
        let p = self.field::<u64>(off);
        if p == 0 {
            if let Some(s) = stats() {
                s.read_errors += 1;
            }
            return None;
        }
        Some(KernelPtr(p))
    }
}

/// A task: `task_struct`.
#[derive(Clone, Copy)]
pub struct Task(pub KernelPtr);

impl Task {
    #[inline(always)]
    pub fn tid(self) -> u32 {
        self.0.field::<i32>(layout!(task_pid)) as u32
    }

    #[inline(always)]
    pub fn tgid(self) -> u32 {
        self.0.field::<i32>(layout!(task_tgid)) as u32
    }

    /// The v2 cgroup id of the worker the task belongs to: the cgroup two levels below the
    /// slice on its cgroup's path, found by walking the cgroup directories (kernfs nodes)
    /// upwards. `None` for tasks outside the slice's workers; those sitting higher in the
    /// tree than a worker leave after three loads.
    #[inline(always)]
    pub fn worker(self, slice: &SliceFilter) -> Option<u64> {
        let css_set = self.0.pointer(layout!(task_cgroups))?;
        let cgroup = css_set.pointer(layout!(css_set_dfl_cgrp))?;
        let level: i32 = cgroup.field(layout!(cgroup_level));
        let below_worker = level - (layout!(slice_level) as i32 + 2);
        if below_worker < 0 {
            return None;
        }
        if below_worker > MAX_NESTING as i32 {
            if let Some(s) = stats() {
                s.too_deep += 1;
            }
            return None;
        }
        let parent = layout!(kernfs_node_parent);
        let mut worker = cgroup.pointer(layout!(cgroup_kn))?;
        for i in 0..MAX_NESTING as i32 {
            if i >= below_worker {
                break;
            }
            worker = worker.pointer(parent)?;
        }
        let slice_node = worker.pointer(parent)?.pointer(parent)?;
        if slice_node.field::<u64>(layout!(kernfs_node_id)) != slice.id {
            return None;
        }
        Some(worker.field(layout!(kernfs_node_id)))
    }

    /// Writes the task's counters into `c`, member by member (a struct copy could become a
    /// `memcpy` call, which verifiers before 6.8 refuse). `sched_now` is the scheduler clock
    /// now (`None` if unknown): a task on a CPU gets the time it has run since it was last
    /// charged added.
    #[inline(always)]
    pub fn fill_counters(self, c: &mut TaskCounters, sched_now: Option<u64>) {
        let t = self.0;
        let runtime_at = layout!(task_sum_exec_runtime);
        let mut runtime = t.field_or_zero(runtime_at);
        let mut uncharged = 0;
        if let Some(now) = sched_now.filter(|_| runtime_at != MISSING && uncharged_known()) {
            if t.field::<u8>(layout!(task_on_cpu)) != 0 {
                // The scheduler sets exec_start, then adds to sum_exec_runtime: a charge
                // between the two loads shows as a changed runtime, and is read again.
                uncharged = self.uncharged(now);
                let again: u64 = t.field(runtime_at);
                if again != runtime {
                    runtime = again;
                    uncharged = self.uncharged(now);
                }
            }
        }
        c.cpu_ns = runtime + uncharged;
        c.run_delay_ns = t.field_or_zero(layout!(task_run_delay));
        c.pcount = t.field_or_zero(layout!(task_pcount));
        c.nvcsw = t.field_or_zero(layout!(task_nvcsw));
        c.nivcsw = t.field_or_zero(layout!(task_nivcsw));
        c.rchar = t.field_or_zero(layout!(task_rchar));
        c.wchar = t.field_or_zero(layout!(task_wchar));
        c.read_bytes = t.field_or_zero(layout!(task_read_bytes));
        c.write_bytes = t.field_or_zero(layout!(task_write_bytes));
    }

    /// Time a running task has run since its last charge: from its `exec_start` to its run
    /// queue's last clock update, in the run queue's task clock, plus the scheduler clock's
    /// advance since that update. The task clock leaves out time a hypervisor stole (and
    /// IRQ time, where accounted), which the kernel will not charge either; the advance is
    /// scaled by the share of its clock the run queue has kept so far, its best estimate.
    #[inline(always)]
    fn uncharged(self, sched_now: u64) -> u64 {
        let Some(rq) = self.run_queue() else { return 0 };
        let exec_start: u64 = self.0.field(layout!(task_exec_start));
        // The scheduler updates `clock`, then `clock_task`: a `clock` from before an update
        // with a `clock_task` from after it would count the update's step twice.
        let mut clock: u64 = rq.field(layout!(rq_clock));
        let mut clock_task: u64 = rq.field(layout!(rq_clock_task));
        let again: u64 = rq.field(layout!(rq_clock));
        if again != clock {
            clock = again;
            clock_task = rq.field(layout!(rq_clock_task));
        }
        let advance = sched_now.saturating_sub(clock).min(MAX_UNCHARGED_NS);
        // Parts per 1024 of the clock the task clock kept.
        let kept = (clock_task / ((clock >> 10) | 1)).min(1024);
        let t = clock_task.saturating_sub(exec_start) + (advance * kept >> 10);
        t.min(MAX_UNCHARGED_NS)
    }

    #[inline(always)]
    fn run_queue(self) -> Option<KernelPtr> {
        self.0.pointer(layout!(task_cfs_rq))?.pointer(layout!(cfs_rq_rq))
    }

    /// Writes the task's record into `r`, member by member (see `fill_counters`).
    #[inline(always)]
    pub fn fill_record(self, r: &mut TaskRecord, worker: u64, sched_now: Option<u64>) {
        r.worker = worker;
        r.start_ns = self.0.field(layout!(task_start_time));
        r.tid = self.tid();
        r.tgid = self.tgid();
        r.flags = if self.0.field::<u32>(layout!(task_flags)) & PF_EXITING != 0 { TASK_EXITING } else { 0 };
        r._pad = 0;
        self.fill_counters(&mut r.counters, sched_now);
    }
}

/// Whether this kernel has every member `Task::uncharged` reads.
#[inline(always)]
fn uncharged_known() -> bool {
    layout!(task_on_cpu) != MISSING
        && layout!(task_exec_start) != MISSING
        && layout!(task_cfs_rq) != MISSING
        && layout!(cfs_rq_rq) != MISSING
        && layout!(rq_clock) != MISSING
        && layout!(rq_clock_task) != MISSING
}

/// `task_struct.flags`: the task has begun to exit (`include/linux/sched.h`, the same value
/// on every supported kernel).
const PF_EXITING: u32 = 0x4;

/// Uncharged time above this is not believed: a running task is charged at every tick, and
/// at least once a second with `nohz_full`.
const MAX_UNCHARGED_NS: u64 = 1_000_000_000;

/// `CLOCK_MONOTONIC − sched_clock` (wrapping: it may be negative), measured on this CPU from
/// its run queue's clock. The loader yields the CPU just before it starts an iteration, which
/// updates that clock, so the offset is then exact to a few microseconds. `None` when it
/// cannot be read.
#[inline(always)]
pub fn clock_offset() -> Option<u64> {
    if !uncharged_known() {
        return None;
    }
    // SAFETY: bpf_get_current_task has no preconditions; the reads below go through
    // bpf_probe_read_kernel, which checks every address.
    let current = unsafe { bpf_get_current_task() };
    let read = |addr: u64| unsafe { bpf_probe_read_kernel(addr as *const u64) }.ok().filter(|v| *v != 0);
    let cfs_rq = read(current + layout!(task_cfs_rq) as u64)?;
    let rq = read(cfs_rq + layout!(cfs_rq_rq) as u64)?;
    let clock = read(rq + layout!(rq_clock) as u64)?;
    Some(monotonic_ns().wrapping_sub(clock))
}

#[inline(always)]
pub fn monotonic_ns() -> u64 {
    // SAFETY: no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// The scheduler clock now, from an offset `clock_offset` measured.
#[inline(always)]
pub fn sched_now(offset: u64) -> u64 {
    monotonic_ns().wrapping_sub(offset)
}
