//! The maps the probes share with the loader.
use core::{
    ffi::c_void,
    ptr::{read_volatile, write_volatile},
};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_probe_read_kernel, generated::bpf_map_lookup_percpu_elem},
    macros::map,
    maps::{Array, PerCpuArray, PerCpuHashMap, RingBuf},
    EbpfContext,
};
use aya_log_ebpf::warn;
use monitor_common::{
    ClockOffset, ProbeStats, ProcessCounts, SliceFilter, TaskEvent, TaskEventKind, EVENTS_BYTES, MAX_CPUS,
    MAX_WORKERS, MISSING,
};

use crate::kernel::{layout, monotonic_ns, Task};

/// Worker cgroup id → its process counts. Per CPU, so forks on many cores never contend.
#[map]
pub static WORKERS: PerCpuHashMap<u64, ProcessCounts> = PerCpuHashMap::with_max_entries(MAX_WORKERS, 0);

/// The watched slice (one entry), set by the loader.
#[map]
pub static SLICE: Array<SliceFilter> = Array::with_max_entries(1, 0);

/// The clock offset the last task iteration measured, for the exit probe.
#[map]
pub static CLOCK: Array<ClockOffset> = Array::with_max_entries(1, 0);

/// Task events of the workers, to the loader.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

#[map]
pub static STATS: PerCpuArray<ProbeStats> = PerCpuArray::with_max_entries(1, 0);

/// One per-CPU slot: its address on a CPU, less its per-CPU pointer, is that CPU's per-CPU
/// offset (`__per_cpu_offset[cpu]`, which only kallsyms' data symbols would tell otherwise).
#[map]
pub static CPU_BASE: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Each CPU's per-CPU offset, found by `find_cpu_offsets`. The last entry is where addresses
/// are stored to be read back as plain numbers.
#[map]
pub static CPU_OFFSETS: Array<u64> = Array::with_max_entries(MAX_CPUS + 1, 0);

/// Fills `CPU_OFFSETS` for the first `nr_cpus` CPUs, where processes' memory counters are
/// per-CPU (`rss_counter_percpu`); `None` elsewhere, or when one cannot be found. Each is
/// the address of `CPU_BASE`'s slot on that CPU (`bpf_map_lookup_percpu_elem`) less the
/// slot's per-CPU pointer, which the map keeps in `struct bpf_array.pptrs[0]`. Reading an
/// address as a number takes a privileged loader (the verifier's `allow_ptr_leaks`), which
/// this one is.
#[inline(always)]
pub fn find_cpu_offsets() -> Option<()> {
    if layout!(rss_counter_percpu) == MISSING {
        return None;
    }
    let (cpus, pptrs_at) = (layout!(nr_cpus), layout!(bpf_array_pptrs));
    let scratch = CPU_OFFSETS.get_ptr_mut(MAX_CPUS)?;
    let map = (&raw const CPU_BASE).cast_mut().cast::<c_void>();
    // SAFETY: `scratch` is a map value of ours; the volatile load makes the compiler read
    // back, as a number, the address it stored.
    let as_number = |p: *const c_void| unsafe {
        write_volatile(scratch, p as u64);
        read_volatile(scratch)
    };
    let pptr_at = as_number(map) + u64::from(pptrs_at);
    // SAFETY: bpf_probe_read_kernel checks the address and fails on a fault.
    let pptr = unsafe { bpf_probe_read_kernel(pptr_at as *const u64) }.ok()?;
    let key = 0u32;
    for cpu in 0..MAX_CPUS {
        if cpu >= cpus {
            break;
        }
        // SAFETY: our per-CPU array and a key it has; NULL for a CPU that does not exist.
        let slot = unsafe { bpf_map_lookup_percpu_elem(map, (&raw const key).cast(), cpu) };
        if slot.is_null() {
            return None;
        }
        let offset = as_number(slot).wrapping_sub(pptr);
        // SAFETY: an entry of our array map, a plain u64.
        unsafe { write_volatile(CPU_OFFSETS.get_ptr_mut(cpu)?, offset) };
    }
    Some(())
}

/// CPU `cpu`'s per-CPU offset, as `find_cpu_offsets` found it.
#[inline(always)]
pub fn cpu_offset(cpu: u32) -> Option<u64> {
    CPU_OFFSETS.get(cpu).copied()
}

/// The watched slice, or `None` while there is none: then no probe does any work.
#[inline(always)]
pub fn slice() -> Option<&'static SliceFilter> {
    let slice = SLICE.get(0)?;
    (slice.id != 0).then_some(slice)
}

#[inline(always)]
pub fn stats() -> Option<&'static mut ProbeStats> {
    // SAFETY: per-CPU value, and the probes do not nest on one CPU.
    STATS.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// The last measured `CLOCK_MONOTONIC − sched_clock`, `None` before the first iteration.
#[inline(always)]
pub fn clock_offset() -> Option<u64> {
    CLOCK.get(0).map(|c| c.monotonic_minus_sched_ns).filter(|o| *o != 0)
}

#[inline(always)]
pub fn set_clock_offset(offset: u64) {
    if let Some(c) = CLOCK.get_ptr_mut(0) {
        // SAFETY: a plain u64 store; a racing reader sees the old or the new offset.
        unsafe { (*c).monotonic_minus_sched_ns = offset };
    }
}

/// This CPU's process counts of `worker`, created on the worker's first event.
#[inline(always)]
pub fn process_counts<C: EbpfContext>(ctx: &C, worker: u64) -> Option<&'static mut ProcessCounts> {
    if let Some(p) = WORKERS.get_ptr_mut(&worker) {
        // SAFETY: a per-CPU value, and the probes do not nest on one CPU, so this is the
        // only reference to it while the program runs.
        return Some(unsafe { &mut *p });
    }
    let _ = WORKERS.insert(&worker, &ProcessCounts::default(), BPF_NOEXIST as u64);
    match WORKERS.get_ptr_mut(&worker) {
        // SAFETY: as above.
        Some(p) => Some(unsafe { &mut *p }),
        None => {
            if let Some(s) = stats() {
                if s.workers_full == 0 {
                    warn!(
                        ctx,
                        "WORKERS map full ({} entries): worker cgroup {} not counted", MAX_WORKERS, worker
                    );
                }
                s.workers_full += 1;
            }
            None
        }
    }
}

/// Sends a task event about `task` in `worker`, written member by member into the ring
/// buffer (no struct copy, see `Task::fill_counters`); a full ring buffer is counted, not
/// waited on.
#[inline(always)]
pub fn emit(kind: TaskEventKind, flags: u32, parent: u32, task: Task, worker: u64, sched_now: Option<u64>) {
    let Some(mut entry) = EVENTS.reserve::<TaskEvent>(0) else {
        if let Some(s) = stats() {
            s.events_lost += 1;
        }
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` is the reserved entry, written in full before it is submitted.
    unsafe {
        (*e).kind = kind as u32;
        (*e).flags = flags;
        (*e).parent = parent;
        (*e)._pad = 0;
        (*e).at_ns = monotonic_ns();
        task.fill_record(&mut (*e).task, worker, sched_now);
    }
    entry.submit(0);
}
