//! The maps the probes share with the loader, and the counters' update helpers.
use core::ffi::c_void;

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_map_lookup_percpu_elem,
    macros::map,
    maps::{Array, PerCpuArray, PerCpuHashMap, RingBuf},
    EbpfContext,
};
use aya_log_ebpf::warn;
use monitor_common::{
    CurrentTask, ProbeStats, SliceFilter, TaskEvent, WorkerCounters, EVENTS_BYTES, MAX_WORKERS,
};

/// Worker cgroup id → counters. Per CPU, so a worker busy on many cores never contends.
#[map]
pub static WORKERS: PerCpuHashMap<u64, WorkerCounters> = PerCpuHashMap::with_max_entries(MAX_WORKERS, 0);

/// Per CPU: the task it switched to last.
#[map]
pub static CURRENT: PerCpuArray<CurrentTask> = PerCpuArray::with_max_entries(1, 0);

/// The watched slice (one entry), set by the loader.
#[map]
pub static SLICE: Array<SliceFilter> = Array::with_max_entries(1, 0);

/// Lifecycle events of the worker's processes, to the loader.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

#[map]
pub static STATS: PerCpuArray<ProbeStats> = PerCpuArray::with_max_entries(1, 0);

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

#[inline(always)]
pub fn current() -> Option<&'static mut CurrentTask> {
    // SAFETY: per-CPU value, written only by this CPU's sched_switch.
    CURRENT.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// The counters of `worker` in this CPU's slot, created on the worker's first event.
#[inline(always)]
pub fn counters<C: EbpfContext>(ctx: &C, worker: u64) -> Option<&'static mut WorkerCounters> {
    counters_with(ctx, worker, || WORKERS.get_ptr_mut(worker))
}

/// The counters of `worker` in CPU `cpu`'s slot. The kernel charges a task only under its
/// CPU's run-queue lock, so writing another CPU's slot from here does not race with that CPU.
#[inline(always)]
pub fn counters_on_cpu<C: EbpfContext>(
    ctx: &C,
    worker: u64,
    cpu: u32,
) -> Option<&'static mut WorkerCounters> {
    counters_with(ctx, worker, || {
        let map = (&raw const WORKERS).cast_mut().cast::<c_void>();
        let key = (&raw const worker).cast::<c_void>();
        let p = unsafe { bpf_map_lookup_percpu_elem(map, key, cpu) };
        (!p.is_null()).then_some(p.cast::<WorkerCounters>())
    })
}

#[inline(always)]
fn counters_with<C: EbpfContext>(
    ctx: &C,
    worker: u64,
    lookup: impl Fn() -> Option<*mut WorkerCounters>,
) -> Option<&'static mut WorkerCounters> {
    // SAFETY: slots are written under the owning CPU's run-queue lock (see above).
    if let Some(p) = lookup() {
        return Some(unsafe { &mut *p });
    }
    let _ = WORKERS.insert(worker, WorkerCounters::default(), BPF_NOEXIST as u64);
    match lookup() {
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

/// Sends a lifecycle event; a full ring buffer is counted, not waited on.
#[inline(always)]
pub fn emit(event: TaskEvent) {
    if EVENTS.output::<TaskEvent>(&event, 0).is_err() {
        if let Some(s) = stats() {
            s.events_lost += 1;
        }
    }
}
