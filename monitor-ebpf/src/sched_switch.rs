//! `sched_switch`: context-switch counts, which worker (if any) now runs here, and the
//! run-queue wait of the task switched in. That wait is the kernel's own: just after this
//! event `sched_info_arrive()` adds `rq_clock - sched_info.last_queued` to the task's
//! `run_delay` (`/proc/<pid>/schedstat`), and the same difference is taken here, from the
//! same clock, so no time is read and nothing is kept per task. Growth of `run_delay` this
//! did not see (a task that joined a worker while waiting) is added when the task leaves.
use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::btf_tracepoint, programs::BtfTracePointContext};
use monitor_common::{CurrentTask, WorkerCounters};

use crate::{
    kernel::{arg, field, layout, pointer, task_css_set, worker_cached, worker_of},
    maps::{counters, current, slice},
};

#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch(ctx: BtfTracePointContext) -> i32 {
    let Some(slice) = slice() else { return 0 };
    let Some(current) = current() else { return 0 };
    let preempt = arg::<4>(&ctx, layout!(switch_preempt)) as u8 != 0;
    let prev = arg::<4>(&ctx, layout!(switch_prev));
    let next = arg::<4>(&ctx, layout!(switch_next));
    let prev_state = arg::<4>(&ctx, layout!(switch_prev_state)) as u32;

    // `prev` is normally the task this CPU switched to last time: reuse its classification.
    let prev_worker = worker_cached(Some(current), prev, slice);
    let mut prev_counters = None;
    if prev_worker != 0 {
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
            if current.task == prev {
                add_wait(c, prev, current);
            }
            prev_counters = Some(c);
        }
    }

    // Recorded for every task: one that joins a worker while running must add only the
    // waits after this, not its whole past.
    let mut run_delay: u64 = field(next, layout!(task_run_delay));
    let mut pcount: u64 = field(next, layout!(task_pcount));
    let next_worker = worker_of(next, slice).unwrap_or(0);
    if next_worker != 0 {
        // Ping-pong within one worker, the common case, needs one lookup, not two.
        let c = match prev_counters {
            Some(c) if next_worker == prev_worker => Some(c),
            _ => counters(&ctx, next_worker),
        };
        if let Some(c) = c {
            c.running_since_ns = unsafe { bpf_ktime_get_ns() };
            if let Some(clock) = rq_clock(next) {
                let queued: u64 = field(next, layout!(task_last_queued));
                let wait = if queued != 0 { clock.saturating_sub(queued) } else { 0 };
                c.runq_wait_ns += wait;
                c.runq_waits += 1;
                // What the kernel's figures will be once it has added this wait.
                run_delay += wait;
                pcount += 1;
            }
        }
    }
    *current =
        CurrentTask { task: next, css_set: task_css_set(next), worker: next_worker, run_delay, pcount };
    0
}

/// The clock of the run queue `task` is on (`rq_clock()`, as the scheduler last updated it).
#[inline(always)]
fn rq_clock(task: u64) -> Option<u64> {
    let cfs_rq = pointer(task, layout!(task_cfs_rq))?;
    let rq = pointer(cfs_rq, layout!(cfs_rq_rq))?;
    Some(field(rq, layout!(rq_clock)))
}

/// Adds to `c` the run-queue wait `task` accrued since `seen` recorded it, and records the
/// new figures.
#[inline(always)]
pub fn add_wait(c: &mut WorkerCounters, task: u64, seen: &mut CurrentTask) {
    let run_delay: u64 = field(task, layout!(task_run_delay));
    let pcount: u64 = field(task, layout!(task_pcount));
    c.runq_wait_ns += run_delay.saturating_sub(seen.run_delay);
    c.runq_waits += pcount.saturating_sub(seen.pcount);
    seen.run_delay = run_delay;
    seen.pcount = pcount;
}
