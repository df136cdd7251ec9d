//! Reading the kernel structures the probes need, at offsets the loader resolved from BTF.
//!
//! The programs' task arguments are BTF-typed pointers, so the verifier lets them load fields
//! directly (a plain load with a fault handler, far cheaper than a `bpf_probe_read_kernel`
//! call) as long as each offset is a known constant and matches a field of the right size.
//! The offsets come from `LAYOUT`, a frozen read-only global, which the verifier treats as
//! constants; a member the kernel lacks is `MISSING`, and its branch is never verified.
//!
//! Each kernel struct read here has its own type (`Task`, `Mm`, `CssSet`, `Cgroup`, `KernfsNode`,
//! `CfsRq`, `Rq`, `IterMeta`), with one accessor per member it reads, named after it; the
//! pointer-following ones return the pointee's type. The raw load, `KernelPtr::field`, is
//! `unsafe`, and only those accessors (and its two helpers) call it.
use core::ffi::c_void;

use aya_ebpf::{
    bindings::seq_file,
    helpers::{bpf_get_current_task, bpf_ktime_get_ns, bpf_probe_read_kernel},
};
use monitor_common::{
    CgroupMemory, KernelLayout, ProcessMemory, SliceFilter, TaskCounters, TaskRecord, MAX_CPUS, MAX_NESTING,
    MISSING, MM_ANONPAGES, MM_FILEPAGES, MM_SHMEMPAGES, TASK_EXITING, TASK_MAY_STALL,
};

use crate::maps::{cpu_offset, stats};

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
/// member loaded from one. It is private to this module: only the typed wrappers below
/// (`Task`, `Mm`, `CssSet`, `Cgroup`, `KernfsNode`, `CfsRq`, `Rq`, `IterMeta`) hold one, and each
/// reads only its own struct's members, so reading a `kernfs_node` member from a task does
/// not type-check.
///
/// "CORE" in the `SAFETY` comments below: a member every program needs (monitor-user's
/// `figures::CORE`). The loader loads no program while one of those is `MISSING`, so in a
/// loaded program none is.
#[derive(Clone, Copy)]
struct KernelPtr(u64);

impl KernelPtr {
    /// # Safety
    /// `p` must be a BTF-typed kernel pointer (see the type's documentation) or NULL.
    #[inline(always)]
    unsafe fn new(p: u64) -> Option<Self> {
        (p != 0).then_some(Self(p))
    }

    /// The address, as a number.
    #[inline(always)]
    fn address(self) -> u64 {
        self.0
    }

    /// The member of type `T` at byte `off`.
    ///
    /// # Safety
    /// - `self` is BTF-typed (for the verifier) as the struct whose member sits at `off`;
    /// - `off` is that member's offset: a `LAYOUT` offset the loader resolved for this struct
    ///   and this member, never `MISSING` (the caller excludes it, or the loader does not
    ///   load a program whose needs include a missing member), or a fixed offset the kernel
    ///   ABI guarantees;
    /// - `T` is the member's size, or narrower (its low bytes on this little-endian target).
    ///
    /// The verifier then checks the load against the BTF type at this constant offset, and
    /// a fault on a torn-down object reads as zero.
    #[inline(always)]
    unsafe fn field<T: Copy>(self, off: u32) -> T {
        // SAFETY: the caller's contract above: a typed pointer and one of its members, which
        // the verifier checks and turns into a fault-handled load.
        unsafe { core::ptr::read_volatile((self.0 as *const u8).add(off as usize).cast::<T>()) }
    }

    /// `field::<u64>`, or 0 when this kernel lacks the member.
    ///
    /// # Safety
    /// As for `field` with `T = u64`, except that `off` may be `MISSING`.
    #[inline(always)]
    unsafe fn field_or_zero(self, off: u32) -> u64 {
        if off == MISSING {
            0
        } else {
            // SAFETY: `off` is not MISSING (checked just above); the rest is our contract.
            unsafe { self.field(off) }
        }
    }

    /// A pointer member; `None` (and counted) when NULL, as for a task being torn down.
    ///
    /// # Safety
    /// As for `field` with `T = u64`, for a member that is a pointer; the result is
    /// BTF-typed as that pointer's target, which the caller wraps in its type.
    #[inline(always)]
    unsafe fn pointer(self, off: u32) -> Option<KernelPtr> {
        // SAFETY: our contract: a pointer member (u64) of the struct `self` points to.
        let p = unsafe { self.field::<u64>(off) };
        if p == 0 {
            if let Some(s) = stats() {
                s.read_errors += 1;
            }
            return None;
        }
        Some(KernelPtr(p))
    }
}

/// A task: `struct task_struct`.
#[derive(Clone, Copy)]
pub struct Task(KernelPtr);

impl Task {
    /// # Safety
    /// `p` must be a BTF-typed `struct task_struct *` (a program argument or context member
    /// of that type, checked by the loader) or NULL.
    #[inline(always)]
    pub unsafe fn new(p: u64) -> Option<Self> {
        // SAFETY: our contract.
        unsafe { KernelPtr::new(p) }.map(Task)
    }

    /// `pid`, the thread id.
    #[inline(always)]
    pub fn tid(self) -> u32 {
        let at = layout!(task_pid);
        // SAFETY: a task_struct, at LAYOUT's `task_struct.pid` (an int; a CORE member, so
        // never MISSING in a loaded program).
        unsafe { self.0.field::<i32>(at) as u32 }
    }

    /// `tgid`, the process id.
    #[inline(always)]
    pub fn tgid(self) -> u32 {
        let at = layout!(task_tgid);
        // SAFETY: a task_struct, at LAYOUT's `task_struct.tgid` (an int; CORE, never MISSING).
        unsafe { self.0.field::<i32>(at) as u32 }
    }

    /// `start_time`, ns since boot (CLOCK_MONOTONIC).
    #[inline(always)]
    fn start_time(self) -> u64 {
        let at = layout!(task_start_time);
        // SAFETY: a task_struct, at LAYOUT's `task_struct.start_time` (a u64; CORE).
        unsafe { self.0.field(at) }
    }

    /// `flags` (`PF_*`).
    #[inline(always)]
    fn flags(self) -> u32 {
        let at = layout!(task_flags);
        // SAFETY: a task_struct, at LAYOUT's `task_struct.flags` (an unsigned int; CORE).
        unsafe { self.0.field(at) }
    }

    /// Whether the task may be stalled now, as pressure stall information counts it: queued
    /// to run (`on_rq`), or in an uninterruptible sleep (`TASK_UNINTERRUPTIBLE`, which I/O
    /// and memory waits use). `true` where this kernel lacks either member.
    #[inline(always)]
    fn may_stall(self) -> bool {
        let (state, on_rq) = (layout!(task_state), layout!(task_on_rq));
        if state == MISSING || on_rq == MISSING {
            return true;
        }
        // SAFETY: a task_struct, at LAYOUT's `task_struct.__state`, not MISSING (checked
        // above): a u32 (`state`, a long, before 5.14, read as its low 32 bits).
        let state: u32 = unsafe { self.0.field(state) };
        // SAFETY: a task_struct, at LAYOUT's `task_struct.on_rq`, not MISSING (checked above):
        // an int (a u8 from 7.0), read as its low byte.
        let on_rq: u8 = unsafe { self.0.field(on_rq) };
        on_rq != 0 || state & TASK_UNINTERRUPTIBLE != 0
    }

    /// `cgroups`, the task's cgroup set.
    #[inline(always)]
    fn css_set(self) -> Option<CssSet> {
        let at = layout!(task_cgroups);
        // SAFETY: a task_struct, at LAYOUT's `task_struct.cgroups`, a `struct css_set *`
        // (CORE, never MISSING).
        unsafe { self.0.pointer(at) }.map(CssSet)
    }

    /// `on_cpu`: whether the task runs on a CPU now.
    #[inline(always)]
    fn on_cpu(self, _: SchedMembers) -> bool {
        let at = layout!(task_on_cpu);
        // SAFETY: a task_struct, at LAYOUT's `task_struct.on_cpu`, not MISSING (`SchedMembers`
        // says so); an int (a u8 from 7.0), read as its low byte.
        unsafe { self.0.field::<u8>(at) != 0 }
    }

    /// `se.exec_start`: the run queue's task clock when the task was last charged.
    #[inline(always)]
    fn exec_start(self, _: SchedMembers) -> u64 {
        let at = layout!(task_exec_start);
        // SAFETY: a task_struct, at LAYOUT's `task_struct.se.exec_start` (a u64), not MISSING
        // (`SchedMembers`).
        unsafe { self.0.field(at) }
    }

    /// `se.cfs_rq`: the CFS run queue the task is on.
    #[inline(always)]
    fn cfs_rq(self, _: SchedMembers) -> Option<CfsRq> {
        let at = layout!(task_cfs_rq);
        // SAFETY: a task_struct, at LAYOUT's `task_struct.se.cfs_rq`, a `struct cfs_rq *`,
        // not MISSING (`SchedMembers`).
        unsafe { self.0.pointer(at) }.map(CfsRq)
    }

    /// `sched_info.run_delay`, or 0 when this kernel lacks it.
    #[inline(always)]
    fn run_delay(self) -> u64 {
        let at = layout!(task_run_delay);
        // SAFETY: a task_struct, at LAYOUT's `task_struct.sched_info.run_delay` (a u64) or
        // MISSING, which field_or_zero excludes.
        unsafe { self.0.field_or_zero(at) }
    }

    /// `sched_info.pcount`, or 0 when this kernel lacks it.
    #[inline(always)]
    fn pcount(self) -> u64 {
        let at = layout!(task_pcount);
        // SAFETY: a task_struct, at LAYOUT's `sched_info.pcount` (a u64) or MISSING.
        unsafe { self.0.field_or_zero(at) }
    }

    /// `nvcsw`, or 0 when this kernel lacks it.
    #[inline(always)]
    fn nvcsw(self) -> u64 {
        let at = layout!(task_nvcsw);
        // SAFETY: a task_struct, at LAYOUT's `task_struct.nvcsw` (an unsigned long) or MISSING.
        unsafe { self.0.field_or_zero(at) }
    }

    /// `nivcsw`, or 0 when this kernel lacks it.
    #[inline(always)]
    fn nivcsw(self) -> u64 {
        let at = layout!(task_nivcsw);
        // SAFETY: a task_struct, at LAYOUT's `task_struct.nivcsw` (an unsigned long) or MISSING.
        unsafe { self.0.field_or_zero(at) }
    }

    /// `ioac.rchar`, or 0 when this kernel lacks it.
    #[inline(always)]
    fn rchar(self) -> u64 {
        let at = layout!(task_rchar);
        // SAFETY: a task_struct, at LAYOUT's `task_struct.ioac.rchar` (a u64) or MISSING.
        unsafe { self.0.field_or_zero(at) }
    }

    /// `ioac.wchar`, or 0 when this kernel lacks it.
    #[inline(always)]
    fn wchar(self) -> u64 {
        let at = layout!(task_wchar);
        // SAFETY: a task_struct, at LAYOUT's `task_struct.ioac.wchar` (a u64) or MISSING.
        unsafe { self.0.field_or_zero(at) }
    }

    /// `ioac.read_bytes`, or 0 when this kernel lacks it.
    #[inline(always)]
    fn read_bytes(self) -> u64 {
        let at = layout!(task_read_bytes);
        // SAFETY: a task_struct, at LAYOUT's `task_struct.ioac.read_bytes` (a u64) or MISSING.
        unsafe { self.0.field_or_zero(at) }
    }

    /// `ioac.write_bytes`, or 0 when this kernel lacks it.
    #[inline(always)]
    fn write_bytes(self) -> u64 {
        let at = layout!(task_write_bytes);
        // SAFETY: a task_struct, at LAYOUT's `task_struct.ioac.write_bytes` (a u64) or MISSING.
        unsafe { self.0.field_or_zero(at) }
    }

    /// The v2 cgroup id of the worker the task belongs to: the cgroup two levels below the
    /// slice on its cgroup's path, found by walking the cgroup directories (kernfs nodes)
    /// upwards. `None` for tasks outside the slice's workers; those sitting higher in the
    /// tree than a worker leave after three loads.
    #[inline(always)]
    pub fn worker(self, slice: &SliceFilter) -> Option<u64> {
        let cgroup = self.css_set()?.dfl_cgrp()?;
        let level = cgroup.level();
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
        let parent = KernfsNode::parent_member();
        let mut worker = cgroup.kn()?;
        for i in 0..MAX_NESTING as i32 {
            if i >= below_worker {
                break;
            }
            worker = worker.parent(parent)?;
        }
        let slice_node = worker.parent(parent)?.parent(parent)?;
        if slice_node.id() != slice.id {
            return None;
        }
        Some(worker.id())
    }

    /// Writes the task's counters into `c`, member by member (a struct copy could become a
    /// `memcpy` call, which verifiers before 6.8 refuse). `sched_now` is the scheduler clock
    /// now (`None` if unknown): a task on a CPU gets the time it has run since it was last
    /// charged added.
    #[inline(always)]
    pub fn fill_counters(self, c: &mut TaskCounters, sched_now: Option<u64>) {
        let t = self.0;
        // Read once: the re-read below must be at the same member, and the check against
        // MISSING guards both.
        let runtime_at = layout!(task_sum_exec_runtime);
        // SAFETY: a task_struct, at LAYOUT's `task_struct.se.sum_exec_runtime` (a u64) or
        // MISSING, which field_or_zero excludes.
        let mut runtime = unsafe { t.field_or_zero(runtime_at) };
        let mut uncharged = 0;
        let known = match sched_now {
            Some(now) if runtime_at != MISSING => SchedMembers::get().map(|m| (now, m)),
            _ => None,
        };
        if let Some((now, members)) = known {
            if self.on_cpu(members) {
                // The scheduler sets exec_start, then adds to sum_exec_runtime: a charge
                // between the two loads shows as a changed runtime, and is read again.
                uncharged = self.uncharged(now, members);
                // SAFETY: as for `runtime` above, and `runtime_at` is not MISSING here.
                let again: u64 = unsafe { t.field(runtime_at) };
                if again != runtime {
                    runtime = again;
                    uncharged = self.uncharged(now, members);
                }
            }
        }
        c.cpu_ns = runtime + uncharged;
        c.run_delay_ns = self.run_delay();
        c.pcount = self.pcount();
        c.nvcsw = self.nvcsw();
        c.nivcsw = self.nivcsw();
        c.rchar = self.rchar();
        c.wchar = self.wchar();
        c.read_bytes = self.read_bytes();
        c.write_bytes = self.write_bytes();
    }

    /// Time a running task has run since its last charge: from its `exec_start` to its run
    /// queue's last clock update, in the run queue's task clock, plus the scheduler clock's
    /// advance since that update. The task clock leaves out time a hypervisor stole (and
    /// IRQ time, where accounted), which the kernel will not charge either; the advance is
    /// scaled by the share of its clock the run queue has kept so far, its best estimate.
    #[inline(always)]
    fn uncharged(self, sched_now: u64, members: SchedMembers) -> u64 {
        let Some(rq) = self.run_queue(members) else { return 0 };
        let exec_start = self.exec_start(members);
        // The scheduler updates `clock`, then `clock_task`: a `clock` from before an update
        // with a `clock_task` from after it would count the update's step twice.
        let mut clock = rq.clock();
        let mut clock_task = rq.clock_task();
        let again = rq.clock();
        if again != clock {
            clock = again;
            clock_task = rq.clock_task();
        }
        let advance = sched_now.saturating_sub(clock).min(MAX_UNCHARGED_NS);
        // Parts per 1024 of the clock the task clock kept.
        let kept = (clock_task / ((clock >> 10) | 1)).min(1024);
        let t = clock_task.saturating_sub(exec_start) + ((advance * kept) >> 10);
        t.min(MAX_UNCHARGED_NS)
    }

    #[inline(always)]
    fn run_queue(self, members: SchedMembers) -> Option<Rq> {
        self.cfs_rq(members)?.rq()
    }

    /// The process's resident memory, read at its thread group leader. `cpu_offsets` says
    /// whether this pass found the CPUs' per-CPU offsets, which the counters need from 6.2
    /// (`rss_counter_percpu`).
    #[inline(always)]
    pub fn memory(self, cpu_offsets: bool) -> Memory {
        let at = layout!(task_mm);
        if at == MISSING || layout!(mm_rss_stat) == MISSING || self.tid() != self.tgid() {
            return Memory::None;
        }
        // SAFETY: a task_struct, at LAYOUT's `task_struct.mm`, not MISSING (checked above),
        // a `struct mm_struct *`. NULL is normal here (an exiting process), so it is not read
        // through `pointer`, which counts it as an error.
        let Some(mm) = unsafe { KernelPtr::new(self.0.field::<u64>(at)) }.map(Mm) else {
            return Memory::None;
        };
        if layout!(rss_counter_percpu) != MISSING && !cpu_offsets {
            return Memory::Unreadable;
        }
        let read = || {
            Some(ProcessMemory {
                file_pages: mm.rss(MM_FILEPAGES)?,
                anon_pages: mm.rss(MM_ANONPAGES)?,
                shmem_pages: mm.rss(MM_SHMEMPAGES)?,
            })
        };
        read().map_or(Memory::Unreadable, Memory::Read)
    }

    /// The counters of the memory cgroup the task is charged to, written into `m` member by
    /// member; `false` when this kernel lacks the members or one cannot be read. Read
    /// through bpf_probe_read_kernel: the chain passes an array of pointers and typedef'd
    /// atomics, which older verifiers cannot follow by BTF.
    #[inline(always)]
    pub fn memory_cgroup(self, m: &mut CgroupMemory) -> bool {
        let (set_memory, css_cgroup) = (layout!(css_set_memory), layout!(css_cgroup));
        let (usage, watermark) = (layout!(memcg_usage), layout!(memcg_watermark));
        let (max, oom_kills) = (layout!(memcg_max), layout!(memcg_oom_kills));
        if set_memory == MISSING
            || css_cgroup == MISSING
            || usage == MISSING
            || watermark == MISSING
            || max == MISSING
            || oom_kills == MISSING
        {
            return false;
        }
        let [set_memory, css_cgroup, usage, watermark, max, oom_kills] =
            [set_memory, css_cgroup, usage, watermark, max, oom_kills].map(u64::from);
        let Some(set) = self.css_set() else { return false };
        let Some(memcg) = read_u64(set.0.address() + set_memory).filter(|p| *p != 0) else { return false };
        let Some(cgroup) = read_u64(memcg + css_cgroup) else { return false };
        let Some(kn) = read_u64(cgroup + u64::from(layout!(cgroup_kn))) else { return false };
        let (Some(id), Some(u), Some(w), Some(x), Some(o)) = (
            read_u64(kn + u64::from(layout!(kernfs_node_id))),
            read_u64(memcg + usage),
            read_u64(memcg + watermark),
            read_u64(memcg + max),
            read_u64(memcg + oom_kills),
        ) else {
            return false;
        };
        m.id = id;
        m.usage_pages = u;
        m.watermark_pages = w;
        m.max_pages = x;
        m.oom_kills = o;
        true
    }

    /// Writes the task's record into `r`, member by member (see `fill_counters`).
    #[inline(always)]
    pub fn fill_record(self, r: &mut TaskRecord, worker: u64, sched_now: Option<u64>) {
        r.worker = worker;
        r.start_ns = self.start_time();
        r.tid = self.tid();
        r.tgid = self.tgid();
        let exiting = if self.flags() & PF_EXITING != 0 { TASK_EXITING } else { 0 };
        r.flags = exiting | if self.may_stall() { TASK_MAY_STALL } else { 0 };
        r._pad = 0;
        self.fill_counters(&mut r.counters, sched_now);
    }
}

/// A task's cgroup set: `struct css_set`.
#[derive(Clone, Copy)]
struct CssSet(KernelPtr);

impl CssSet {
    /// `dfl_cgrp`: the task's cgroup in the v2 hierarchy.
    #[inline(always)]
    fn dfl_cgrp(self) -> Option<Cgroup> {
        let at = layout!(css_set_dfl_cgrp);
        // SAFETY: a css_set, at LAYOUT's `css_set.dfl_cgrp`, a `struct cgroup *` (CORE, never
        // MISSING in a loaded program).
        unsafe { self.0.pointer(at) }.map(Cgroup)
    }
}

/// A cgroup: `struct cgroup`.
#[derive(Clone, Copy)]
struct Cgroup(KernelPtr);

impl Cgroup {
    /// `level`: its depth below the root (the root is 0).
    #[inline(always)]
    fn level(self) -> i32 {
        let at = layout!(cgroup_level);
        // SAFETY: a cgroup, at LAYOUT's `cgroup.level` (an int; CORE).
        unsafe { self.0.field(at) }
    }

    /// `kn`: its directory.
    #[inline(always)]
    fn kn(self) -> Option<KernfsNode> {
        let at = layout!(cgroup_kn);
        // SAFETY: a cgroup, at LAYOUT's `cgroup.kn`, a `struct kernfs_node *` (CORE).
        unsafe { self.0.pointer(at) }.map(KernfsNode)
    }
}

/// A cgroup's directory: `struct kernfs_node`.
#[derive(Clone, Copy)]
struct KernfsNode(KernelPtr);

/// The offset of `kernfs_node.parent`, read from `LAYOUT` once for a walk up the tree.
#[derive(Clone, Copy)]
struct ParentMember(u32);

impl KernfsNode {
    #[inline(always)]
    fn parent_member() -> ParentMember {
        ParentMember(layout!(kernfs_node_parent))
    }

    /// `parent` (`__parent` from 6.15): the directory above; `None` (and counted) above the
    /// root.
    #[inline(always)]
    fn parent(self, member: ParentMember) -> Option<KernfsNode> {
        // SAFETY: a kernfs_node, at LAYOUT's `kernfs_node.parent` (a `ParentMember` holds
        // only that offset), a `struct kernfs_node *` (CORE, never MISSING).
        unsafe { self.0.pointer(member.0) }.map(KernfsNode)
    }

    /// `id`: for a cgroup's directory, the cgroup id.
    #[inline(always)]
    fn id(self) -> u64 {
        let at = layout!(kernfs_node_id);
        // SAFETY: a kernfs_node, at LAYOUT's `kernfs_node.id` (a u64; CORE).
        unsafe { self.0.field(at) }
    }
}

/// An address space: `struct mm_struct`. Only `Task::memory` makes one, so holding one means
/// this kernel has `mm_struct.rss_stat`.
#[derive(Clone, Copy)]
struct Mm(KernelPtr);

impl Mm {
    /// Resident pages of kind `i` (`MM_FILEPAGES`, ...), as `/proc/<pid>/statm` reports
    /// them: `rss_stat[i]`'s count, plus, where the counter is per-CPU (`rss_counter_percpu`),
    /// the per-CPU parts not yet folded in; `None` when a part cannot be read. A fold between
    /// reading the count and the parts moves up to a batch from one to the other; the count
    /// is read again, and the sum taken again if it moved. Negative totals (pages counted
    /// out on one CPU and in on another) read as 0, as in statm.
    #[inline(always)]
    fn rss(self, i: u32) -> Option<u64> {
        let counter = self.0.address() + u64::from(layout!(mm_rss_stat) + i * layout!(rss_counter_size));
        // Through bpf_probe_read_kernel, not a direct load: verifiers before 5.13 or so
        // cannot follow `atomic_long_t`, a typedef, in an array (the counters before 6.2);
        // and a direct load of `counters` types it `__percpu` where BTF tags it so, after
        // which nothing may be added to it.
        let count_at = counter + u64::from(layout!(rss_counter_count));
        let percpu = layout!(rss_counter_percpu);
        // SAFETY: bpf_probe_read_kernel checks the address and fails on a fault.
        let first = unsafe { bpf_probe_read_kernel(count_at as *const i64) }.ok()?;
        let mut total = first;
        if percpu != MISSING {
            // SAFETY: as above.
            let parts = unsafe { bpf_probe_read_kernel((counter + u64::from(percpu)) as *const u64) }.ok()?;
            total = first + per_cpu_sum(parts)?;
            // SAFETY: as above.
            let again = unsafe { bpf_probe_read_kernel(count_at as *const i64) }.ok()?;
            if again != first {
                total = again + per_cpu_sum(parts)?;
            }
        }
        Some(total.max(0) as u64)
    }
}

/// The u64 at kernel address `at`; `None` when it cannot be read.
#[inline(always)]
fn read_u64(at: u64) -> Option<u64> {
    // SAFETY: bpf_probe_read_kernel checks the address and fails on a fault.
    unsafe { bpf_probe_read_kernel(at as *const u64) }.ok()
}

/// What `Task::memory` found.
pub enum Memory {
    /// Nothing to read: not a thread group leader, a process without an address space (any
    /// more), or a kernel without the members.
    None,
    Read(ProcessMemory),
    /// A leader whose counters could not be read.
    Unreadable,
}

/// The sum of a `s32 __percpu` variable over the CPUs (`nr_cpu_ids`, at most `MAX_CPUS`),
/// at the per-CPU offsets the iterator found at the start of its pass; `None` when a part
/// cannot be read.
#[inline(always)]
fn per_cpu_sum(var: u64) -> Option<i64> {
    let cpus = layout!(nr_cpus);
    let mut sum = 0i64;
    for cpu in 0..MAX_CPUS {
        if cpu >= cpus {
            break;
        }
        let at = var.wrapping_add(cpu_offset(cpu)?);
        // SAFETY: bpf_probe_read_kernel checks the address and fails on a fault.
        sum += i64::from(unsafe { bpf_probe_read_kernel(at as *const i32) }.ok()?);
    }
    Some(sum)
}

/// A CFS run queue: `struct cfs_rq`. Only `Task::cfs_rq` makes one, so holding one means
/// this kernel has every member `SchedMembers` stands for.
#[derive(Clone, Copy)]
struct CfsRq(KernelPtr);

impl CfsRq {
    /// `rq`: the CPU's run queue it belongs to.
    #[inline(always)]
    fn rq(self) -> Option<Rq> {
        let at = layout!(cfs_rq_rq);
        // SAFETY: a cfs_rq, at LAYOUT's `cfs_rq.rq`, a `struct rq *`, not MISSING (a CfsRq
        // exists only with `SchedMembers`).
        unsafe { self.0.pointer(at) }.map(Rq)
    }
}

/// A CPU's run queue: `struct rq`. Only `CfsRq::rq` makes one (see `CfsRq`).
#[derive(Clone, Copy)]
struct Rq(KernelPtr);

impl Rq {
    /// `clock`: the scheduler clock at the run queue's last update.
    #[inline(always)]
    fn clock(self) -> u64 {
        let at = layout!(rq_clock);
        // SAFETY: an rq, at LAYOUT's `rq.clock` (a u64), not MISSING (see `Rq`).
        unsafe { self.0.field(at) }
    }

    /// `clock_task`: the run queue's task clock at that update.
    #[inline(always)]
    fn clock_task(self) -> u64 {
        let at = layout!(rq_clock_task);
        // SAFETY: an rq, at LAYOUT's `rq.clock_task` (a u64), not MISSING (see `Rq`).
        unsafe { self.0.field(at) }
    }
}

/// The task iterator's `struct bpf_iter_meta`.
#[derive(Clone, Copy)]
pub struct IterMeta(KernelPtr);

/// `bpf_iter_meta.seq` and `.session_id`: fixed since iterators exist (5.8).
const META_SEQ: u32 = 0;
const META_SESSION: u32 = 8;

impl IterMeta {
    /// `seq`: the seq_file the iterator writes to.
    #[inline(always)]
    pub fn seq(self) -> *mut seq_file {
        // SAFETY: a bpf_iter_meta, at the fixed offset of `seq`, a pointer (u64).
        unsafe { self.0.field::<u64>(META_SEQ) as *mut seq_file }
    }

    /// `session_id`: the same for every task of one read of the iterator.
    #[inline(always)]
    pub fn session_id(self) -> u64 {
        // SAFETY: a bpf_iter_meta, at the fixed offset of `session_id`, a u64.
        unsafe { self.0.field(META_SESSION) }
    }
}

/// The task iterator's context, `struct bpf_iter__task { meta, task }`: `None` on the final
/// call, which has no task.
///
/// # Safety
/// `ctx` must be the context of an `iter/task` program, laid out as `{ meta@0, task@8 }`
/// (the loader checks that layout before it loads the program).
#[inline(always)]
pub unsafe fn task_iter_args(ctx: *mut c_void) -> Option<(IterMeta, Task)> {
    // SAFETY: our contract; the verifier allows only loads at constant offsets from the
    // context, and types both (meta, and the task or NULL on the final call).
    let (meta, task) = unsafe {
        let args = ctx as *const [u64; 2];
        (core::ptr::read_volatile(&(*args)[0]), core::ptr::read_volatile(&(*args)[1]))
    };
    // SAFETY: both are BTF-typed pointers from the iterator's context (or NULL).
    let (Some(meta), Some(task)) = (unsafe { KernelPtr::new(meta) }, unsafe { KernelPtr::new(task) }) else {
        return None;
    };
    Some((IterMeta(meta), Task(task)))
}

/// Proof that this kernel has every member `Task::uncharged` reads (none is `MISSING`):
/// the accessors of those members take one. It is zero-sized, and costs nothing.
#[derive(Clone, Copy)]
struct SchedMembers(());

impl SchedMembers {
    #[inline(always)]
    fn get() -> Option<SchedMembers> {
        let known = layout!(task_on_cpu) != MISSING
            && layout!(task_exec_start) != MISSING
            && layout!(task_cfs_rq) != MISSING
            && layout!(cfs_rq_rq) != MISSING
            && layout!(rq_clock) != MISSING
            && layout!(rq_clock_task) != MISSING;
        known.then_some(SchedMembers(()))
    }
}

/// `task_struct.flags`: the task has begun to exit (`include/linux/sched.h`, the same value
/// on every supported kernel).
const PF_EXITING: u32 = 0x4;

/// `task_struct.__state`: an uninterruptible sleep (`include/linux/sched.h`, the same value
/// on every supported kernel).
const TASK_UNINTERRUPTIBLE: u32 = 0x2;

/// Uncharged time above this is not believed: a running task is charged at every tick, and
/// at least once a second with `nohz_full`.
const MAX_UNCHARGED_NS: u64 = 1_000_000_000;

/// `CLOCK_MONOTONIC − sched_clock` (wrapping: it may be negative), measured on this CPU from
/// its run queue's clock. The loader yields the CPU just before it starts an iteration, which
/// updates that clock, so the offset is then exact to a few microseconds. `None` when it
/// cannot be read.
#[inline(always)]
pub fn clock_offset() -> Option<u64> {
    SchedMembers::get()?;
    // SAFETY: bpf_get_current_task has no preconditions.
    let current = unsafe { bpf_get_current_task() };
    // The current task is not BTF-typed here: these reads go through bpf_probe_read_kernel.
    // SAFETY: bpf_probe_read_kernel checks the address and fails on a fault.
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
