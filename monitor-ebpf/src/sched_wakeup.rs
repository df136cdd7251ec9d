//! `sched_wakeup` and `sched_wakeup_new`: a slice task became runnable; its run-queue wait
//! starts. Attributed to the task woken, never to the waker (`current`).
use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::btf_tracepoint, programs::BtfTracePointContext};

use crate::{
    kernel::{arg, layout, task_tid, worker_of},
    maps::{mark_queued, slice},
};

#[inline(always)]
fn wakeup(ctx: &BtfTracePointContext) -> i32 {
    let Some(slice) = slice() else { return 0 };
    let task = arg::<1>(ctx, layout!(wakeup_task));
    if worker_of(task, slice).is_none() {
        return 0;
    }
    mark_queued(task_tid(task), unsafe { bpf_ktime_get_ns() }, false);
    0
}

#[btf_tracepoint(function = "sched_wakeup")]
pub fn sched_wakeup(ctx: BtfTracePointContext) -> i32 {
    wakeup(&ctx)
}

#[btf_tracepoint(function = "sched_wakeup_new")]
pub fn sched_wakeup_new(ctx: BtfTracePointContext) -> i32 {
    wakeup(&ctx)
}
