//! `sched_switch`: context-switch counts, the end of a run-queue wait, the start of a new one
//! for a task switched out while still runnable, and the CPU's `RUNNING` entry.
use aya_ebpf::{
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use monitor_common::RunningTask;

use crate::{
    kernel::{arg, layout, task_tid, worker_of},
    maps::{counters, mark_queued, slice, QUEUED, RUNNING},
};

#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch(ctx: BtfTracePointContext) -> i32 {
    let Some(slice) = slice() else { return 0 };
    let preempt = arg(&ctx, layout!(switch_preempt)) as u8 != 0;
    let prev = arg(&ctx, layout!(switch_prev));
    let next = arg(&ctx, layout!(switch_next));
    let prev_state = arg(&ctx, layout!(switch_prev_state)) as u32;
    let now = unsafe { bpf_ktime_get_ns() };
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let Some(running) = RUNNING.get_ptr_mut(cpu) else { return 0 };
    // SAFETY: a valid array element; only this CPU rewrites it whole.
    let running = unsafe { &mut *running };

    // `prev` is normally the task this CPU switched to last time: reuse its classification.
    let prev_worker = if running.task == prev { running.worker } else { worker_of(prev, slice).unwrap_or(0) };
    if prev_worker != 0 {
        let tid = task_tid(prev);
        // Same rule as the kernel's nvcsw/nivcsw in __schedule().
        let blocked = !preempt && prev_state != 0;
        if let Some(c) = counters(&ctx, prev_worker) {
            if blocked {
                c.voluntary_switches += 1;
            } else {
                c.involuntary_switches += 1;
            }
        }
        if blocked {
            // A wakeup seen while it was still running must not start a wait now.
            let _ = QUEUED.remove(tid);
        } else {
            mark_queued(tid, now, true);
        }
    }

    let next_worker = worker_of(next, slice).unwrap_or(0);
    let mut next_tid = 0;
    if next_worker != 0 {
        next_tid = task_tid(next);
        if let Some(&since) = unsafe { QUEUED.get(next_tid) } {
            let _ = QUEUED.remove(next_tid);
            if let Some(c) = counters(&ctx, next_worker) {
                c.runq_wait_ns += now.saturating_sub(since);
                c.runq_waits += 1;
            }
        }
    }
    *running = RunningTask { task: next, worker: next_worker, since_ns: now, tid: next_tid, _pad: 0 };
    0
}
