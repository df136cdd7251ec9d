//! `sched_process_fork`, `sched_process_exec`, `sched_process_exit`: a worker's processes
//! starting, running a new program and ending. Each is counted in the worker's counters
//! (exact) and sent to the loader as a `TaskEvent` (lossy when the ring buffer is full, and
//! then counted).
use aya_ebpf::{
    helpers::{bpf_get_current_task_btf, bpf_ktime_get_ns},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use monitor_common::{TaskEvent, TaskEventKind};

use crate::{
    kernel::{arg, field, layout, task_tid, worker_cached},
    maps::{counters, current, emit, slice},
};

#[inline(always)]
fn task_tgid(task: u64) -> u32 {
    field::<i32>(task, layout!(task_tgid)) as u32
}

/// The worker of the current task, 0 when none.
#[inline(always)]
fn current_worker() -> u64 {
    let Some(slice) = slice() else { return 0 };
    let task = unsafe { bpf_get_current_task_btf() } as u64;
    worker_cached(current().as_deref(), task, slice)
}

#[inline(always)]
fn event(worker: u64, kind: TaskEventKind, pid: u32, parent: u32) -> TaskEvent {
    TaskEvent { worker, at_ns: unsafe { bpf_ktime_get_ns() }, kind: kind as u32, pid, parent, _pad: 0 }
}

#[btf_tracepoint(function = "sched_process_fork")]
pub fn sched_process_fork(ctx: BtfTracePointContext) -> i32 {
    let child = arg::<2>(&ctx, layout!(fork_child));
    // A new thread of the same process is not a new process.
    if task_tid(child) != task_tgid(child) {
        return 0;
    }
    // The parent is `current` and the child is still in its cgroups.
    let worker = current_worker();
    if worker == 0 {
        return 0;
    }
    let parent = arg::<2>(&ctx, layout!(fork_parent));
    if let Some(c) = counters(&ctx, worker) {
        c.processes_forked += 1;
    }
    emit(event(worker, TaskEventKind::Fork, task_tgid(child), task_tgid(parent)));
    0
}

#[btf_tracepoint(function = "sched_process_exec")]
pub fn sched_process_exec(ctx: BtfTracePointContext) -> i32 {
    let worker = current_worker();
    if worker == 0 {
        return 0;
    }
    let task = arg::<3>(&ctx, layout!(exec_task));
    if let Some(c) = counters(&ctx, worker) {
        c.execs += 1;
    }
    emit(event(worker, TaskEventKind::Exec, task_tgid(task), 0));
    0
}

#[btf_tracepoint(function = "sched_process_exit")]
pub fn sched_process_exit(ctx: BtfTracePointContext) -> i32 {
    let task = arg::<2>(&ctx, layout!(exit_task));
    let tid = task_tid(task);
    let worker = current_worker();
    if worker == 0 {
        return 0;
    }
    let position = layout!(exit_group_dead);
    let process_ends =
        if position == u32::MAX { tid == task_tgid(task) } else { arg::<2>(&ctx, position) & 0xff != 0 };
    if !process_ends {
        return 0;
    }
    if let Some(c) = counters(&ctx, worker) {
        c.processes_exited += 1;
    }
    emit(event(worker, TaskEventKind::Exit, task_tgid(task), 0));
    0
}
