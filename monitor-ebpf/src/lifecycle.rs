//! `sched_process_fork`, `sched_process_exec`, `sched_process_exit`, `sched_process_free`,
//! `cgroup_attach_task`: a worker's tasks starting, running a new program, ending, and
//! moving between cgroups. They fire once per task lifetime (or move), not per switch. Process counts are kept in `WORKERS` (exact); every event goes
//! to the loader as a `TaskEvent`. An exiting task's counters travel in two events: as of its
//! exit, while it still runs, and final once it is freed after its last switch; the task
//! iterator no longer sees it once it is reaped, in between.
use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use monitor_common::{TaskEvent, TaskEventKind, TaskRecord, EXIT_PROCESS, MISSING};

use crate::{
    kernel::{layout, monotonic_ns, sched_now, KernelPtr, Task},
    maps::{clock_offset, emit, process_counts, slice},
};

/// Tracepoint argument `n` (a position from `LAYOUT`) of a tracepoint with `N` arguments.
/// The verifier allows only constant-offset context loads, each within the prototype's
/// arguments, so all `N` are loaded at fixed offsets and `n` picks among the values; an
/// indexed load, which the compiler makes of a plain `match`, is refused.
#[inline(always)]
fn arg<const N: usize>(ctx: &BtfTracePointContext, n: u32) -> u64 {
    let mut args = [0u64; N];
    let mut i = 0;
    while i < N {
        args[i] = ctx.arg(i);
        i += 1;
    }
    if (n as usize) < N { args[n as usize] } else { 0 }
}

/// Tracepoint argument `n`, a task.
#[inline(always)]
fn task_arg<const N: usize>(ctx: &BtfTracePointContext, n: u32) -> Option<Task> {
    // SAFETY: the loader resolved `n` as a `struct task_struct *` argument from BTF.
    unsafe { KernelPtr::new(arg::<N>(ctx, n)) }.map(Task)
}

#[inline(always)]
fn event(kind: TaskEventKind, flags: u32, parent: u32, task: TaskRecord) -> TaskEvent {
    TaskEvent { kind: kind as u32, flags, parent, _pad: 0, at_ns: monotonic_ns(), task }
}

#[btf_tracepoint(function = "sched_process_fork")]
pub fn sched_process_fork(ctx: BtfTracePointContext) -> i32 {
    let Some(slice) = slice() else { return 0 };
    let Some(child) = task_arg::<2>(&ctx, layout!(fork_child)) else { return 0 };
    // A new thread of the same process is not a new process.
    if child.tid() != child.tgid() {
        return 0;
    }
    // The child is still in its parent's cgroups.
    let Some(worker) = child.worker(slice) else { return 0 };
    let parent = task_arg::<2>(&ctx, layout!(fork_parent)).map_or(0, |p| p.tgid());
    if let Some(c) = process_counts(&ctx, worker) {
        c.forked += 1;
    }
    emit(&event(TaskEventKind::Fork, 0, parent, child.record(worker, None)));
    0
}

#[btf_tracepoint(function = "sched_process_exec")]
pub fn sched_process_exec(ctx: BtfTracePointContext) -> i32 {
    let Some(slice) = slice() else { return 0 };
    let Some(task) = task_arg::<3>(&ctx, layout!(exec_task)) else { return 0 };
    let Some(worker) = task.worker(slice) else { return 0 };
    if let Some(c) = process_counts(&ctx, worker) {
        c.execs += 1;
    }
    emit(&event(TaskEventKind::Exec, 0, 0, task.record(worker, None)));
    0
}

#[btf_tracepoint(function = "sched_process_exit")]
pub fn sched_process_exit(ctx: BtfTracePointContext) -> i32 {
    let Some(slice) = slice() else { return 0 };
    let Some(task) = task_arg::<2>(&ctx, layout!(exit_task)) else { return 0 };
    let Some(worker) = task.worker(slice) else { return 0 };
    let position = layout!(exit_group_dead);
    let process_ends =
        if position == MISSING { task.tid() == task.tgid() } else { arg::<2>(&ctx, position) & 0xff != 0 };
    if process_ends {
        if let Some(c) = process_counts(&ctx, worker) {
            c.exited += 1;
        }
    }
    // The task is running here: with the clock offset its uncharged time is known too.
    let record = task.record(worker, clock_offset().map(sched_now));
    emit(&event(TaskEventKind::Exit, if process_ends { EXIT_PROCESS } else { 0 }, 0, record));
    0
}

#[btf_tracepoint(function = "sched_process_free")]
pub fn sched_process_free(ctx: BtfTracePointContext) -> i32 {
    let Some(slice) = slice() else { return 0 };
    let Some(task) = task_arg::<1>(&ctx, layout!(free_task)) else { return 0 };
    // A freed task keeps its cgroups until the very end, and never runs again.
    let Some(worker) = task.worker(slice) else { return 0 };
    emit(&event(TaskEventKind::Free, 0, 0, task.record(worker, None)));
    0
}

/// A task moved to another cgroup: its counters now, so what it ran before goes to where it
/// was (another worker, or nothing: a worker's process is usually started outside and moved
/// in before it runs its program). Host-wide moves are rare; each is sent, as a task that
/// leaves the slice is in no worker afterwards. Its CPU time is taken as charged so far,
/// without the uncharged rest: the kernel charges that to the new cgroup.
#[btf_tracepoint(function = "cgroup_attach_task")]
pub fn cgroup_attach_task(ctx: BtfTracePointContext) -> i32 {
    let Some(slice) = slice() else { return 0 };
    let Some(task) = task_arg::<4>(&ctx, layout!(attach_task)) else { return 0 };
    // Its v2 cgroup after the move (a v1 move leaves it as it was).
    let worker = task.worker(slice).unwrap_or(0);
    emit(&event(TaskEventKind::Moved, 0, 0, task.record(worker, None)));
    0
}
