//! `sched_stat_runtime`: the CPU time the kernel charges a task in `update_curr()`, the same
//! deltas it adds to the cgroup's `cpu.stat`. The task charged is the one the event names,
//! which is not always this CPU's current task: another CPU may charge it while holding its
//! run-queue lock. Charges land in the slot of the task's own CPU, next to the start of its
//! uncharged time, so the two always agree. A task of this CPU also has the run-queue wait
//! it got the CPU after added here, so a long run does not hide it until the task leaves.
use aya_ebpf::{
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};

use crate::{
    kernel::{arg, layout, task_cpu, worker_cached},
    maps::{counters, counters_on_cpu, current, slice},
    sched_switch::add_wait,
};

#[btf_tracepoint(function = "sched_stat_runtime")]
pub fn sched_stat_runtime(ctx: BtfTracePointContext) -> i32 {
    let Some(slice) = slice() else { return 0 };
    let task = arg::<2>(&ctx, layout!(runtime_task));
    let delta = arg::<2>(&ctx, layout!(runtime_delta));
    let mut cache = current();
    let local = cache.as_ref().is_some_and(|c| c.task == task);
    let worker = worker_cached(cache.as_deref(), task, slice);
    if worker == 0 {
        return 0;
    }
    let slot = match local {
        true => counters(&ctx, worker),
        false => {
            let cpu = task_cpu(task);
            if cpu == unsafe { bpf_get_smp_processor_id() } {
                counters(&ctx, worker)
            } else {
                counters_on_cpu(&ctx, worker, cpu)
            }
        }
    };
    if let Some(c) = slot {
        if let Some(seen) = cache.as_deref_mut().filter(|_| local) {
            add_wait(c, task, seen);
        }
        c.cpu_ns += delta;
        // Everything up to now is charged: the uncharged time restarts here.
        c.running_since_ns = unsafe { bpf_ktime_get_ns() };
    }
    0
}
