//! `sched_switch`: context-switch counts, which worker (if any) now runs here, and what the
//! worker's tasks did while on this CPU. Run-queue wait and I/O are the kernel's own per-task
//! figures (`sched_info`, `ioac`: `/proc/<pid>/schedstat` and `/proc/<pid>/io`); a task
//! adds their growth to its worker when it leaves the CPU (and at each CPU charge while it
//! stays, see `sched_stat_runtime`), measured from when it came on. Nothing is kept per task
//! beyond the task now on each CPU.
use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::btf_tracepoint, programs::BtfTracePointContext};
use monitor_common::{CurrentTask, TaskFigures, WorkerCounters};

use crate::{
    kernel::{arg, field, layout, pointer, task_css_set, task_figures, worker_cached, worker_of},
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
            if current.task == prev && current.worker == prev_worker {
                add_growth(c, &task_figures(prev), &mut current.seen);
            }
            prev_counters = Some(c);
        }
    }

    let next_worker = worker_of(next, slice).unwrap_or(0);
    let mut seen = TaskFigures::default();
    if next_worker != 0 {
        seen = task_figures(next);
        // Ping-pong within one worker, the common case, needs one lookup, not two.
        let c = match prev_counters {
            Some(c) if next_worker == prev_worker => Some(c),
            _ => counters(&ctx, next_worker),
        };
        if let Some(c) = c {
            c.running_since_ns = unsafe { bpf_ktime_get_ns() };
            // The wait the kernel adds to `run_delay` just after this event
            // (`sched_info_arrive()`): its run-queue clock now minus when the task was queued.
            if let Some(clock) = rq_clock(next) {
                let queued: u64 = field(next, layout!(task_last_queued));
                let wait = if queued != 0 { clock.saturating_sub(queued) } else { 0 };
                c.runq_wait_ns += wait;
                c.runq_waits += 1;
                seen.run_delay += wait;
                seen.pcount += 1;
            }
        }
    }
    *current = CurrentTask { task: next, css_set: task_css_set(next), worker: next_worker, seen };
    0
}

/// The clock of the run queue `task` is on (`rq_clock()`, as the scheduler last updated it).
#[inline(always)]
fn rq_clock(task: u64) -> Option<u64> {
    let cfs_rq = pointer(task, layout!(task_cfs_rq))?;
    let rq = pointer(cfs_rq, layout!(cfs_rq_rq))?;
    Some(field(rq, layout!(rq_clock)))
}

/// Adds to `c` how far a task's figures grew from `seen` to `now`, and records `now`.
#[inline(always)]
pub fn add_growth(c: &mut WorkerCounters, now: &TaskFigures, seen: &mut TaskFigures) {
    c.runq_wait_ns += now.run_delay.saturating_sub(seen.run_delay);
    c.runq_waits += now.pcount.saturating_sub(seen.pcount);
    c.syscall_read_bytes += now.rchar.saturating_sub(seen.rchar);
    c.syscall_write_bytes += now.wchar.saturating_sub(seen.wchar);
    c.storage_read_bytes += now.read_bytes.saturating_sub(seen.read_bytes);
    c.storage_write_bytes += now.write_bytes.saturating_sub(seen.write_bytes);
    *seen = *now;
}
