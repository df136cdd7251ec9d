//! `sched_switch`: context-switch counts, the end of a run-queue wait, the start of a new one
//! for a task switched out while still runnable, and which worker (if any) now runs here.
use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::btf_tracepoint, programs::BtfTracePointContext};
use monitor_common::CurrentTask;

use crate::{
    kernel::{arg, layout, task_css_set, task_tid, worker_cached, worker_of},
    maps::{counters, current, mark_queued, slice, QUEUED},
};

#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch(ctx: BtfTracePointContext) -> i32 {
    let Some(slice) = slice() else { return 0 };
    let Some(current) = current() else { return 0 };
    let preempt = arg::<4>(&ctx, layout!(switch_preempt)) as u8 != 0;
    let prev = arg::<4>(&ctx, layout!(switch_prev));
    let next = arg::<4>(&ctx, layout!(switch_next));
    let prev_state = arg::<4>(&ctx, layout!(switch_prev_state)) as u32;
    // Read the clock only for switches that involve a worker.
    let now = || unsafe { bpf_ktime_get_ns() };

    // `prev` is normally the task this CPU switched to last time: reuse its classification.
    let prev_worker = worker_cached(Some(current), prev, slice);
    if prev_worker != 0 {
        let tid = task_tid(prev);
        // Same rule as the kernel's nvcsw/nivcsw in __schedule().
        let blocked = !preempt && prev_state != 0;
        if let Some(c) = counters(&ctx, prev_worker) {
            // Its time up to here was charged just before this event.
            c.running_since_ns = 0;
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
            mark_queued(tid, now(), true);
        }
    }

    let next_worker = worker_of(next, slice).unwrap_or(0);
    if next_worker != 0 {
        if let Some(c) = counters(&ctx, next_worker) {
            let now = now();
            c.running_since_ns = now;
            let tid = task_tid(next);
            if let Some(&since) = unsafe { QUEUED.get(tid) } {
                let _ = QUEUED.remove(tid);
                c.runq_wait_ns += now.saturating_sub(since);
                c.runq_waits += 1;
            }
        }
    }
    *current = CurrentTask { task: next, css_set: task_css_set(next), worker: next_worker };
    0
}
