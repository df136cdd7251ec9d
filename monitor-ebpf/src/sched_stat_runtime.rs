//! `sched_stat_runtime`: the CPU time the kernel charges a task in `update_curr()`, the same
//! deltas it adds to the cgroup's `cpu.stat`. The task charged is the one the event names,
//! which is not always the CPU's current task (remote charging from another CPU's rq lock).
use aya_ebpf::{
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};

use crate::{
    kernel::{arg, layout, task_cpu, worker_of},
    maps::{counters, slice, RUNNING},
};

#[btf_tracepoint(function = "sched_stat_runtime")]
pub fn sched_stat_runtime(ctx: BtfTracePointContext) -> i32 {
    let Some(slice) = slice() else { return 0 };
    let task = arg(&ctx, layout!(runtime_task));
    let delta = arg(&ctx, layout!(runtime_delta));
    let this_cpu = unsafe { bpf_get_smp_processor_id() };

    let local = RUNNING.get_ptr_mut(this_cpu).filter(|r| unsafe { (**r).task } == task);
    let worker = match local {
        Some(r) => unsafe { (*r).worker },
        None => worker_of(task, slice).unwrap_or(0),
    };
    if worker == 0 {
        return 0;
    }
    if let Some(c) = counters(&ctx, worker) {
        c.cpu_ns += delta;
    }
    // Everything up to now is charged: the in-flight time the loader adds restarts here.
    let running =
        local.or_else(|| RUNNING.get_ptr_mut(task_cpu(task)).filter(|r| unsafe { (**r).task } == task));
    if let Some(r) = running {
        unsafe { (*r).since_ns = bpf_ktime_get_ns() };
    }
    0
}
