//! `sched_process_fork`, `sched_process_exec`, `sched_process_exit`, `sched_process_free`,
//! `cgroup_attach_task`: a worker's tasks starting, running a new program, ending, and
//! moving between cgroups. They fire once per task lifetime (or move), not per switch. Process counts are kept in `WORKERS` (exact); every event goes
//! to the loader as a `TaskEvent`. An exiting task's counters travel in two events: as of its
//! exit, while it still runs, and final once it is freed after its last switch; the task
//! iterator no longer sees it once it is reaped, in between.
use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use monitor_common::{TaskEventKind, EXIT_PROCESS, MISSING};

use crate::{
    kernel::{layout, sched_now, Task},
    maps::{clock_offset, emit, process_counts, slice},
};

/// Tracepoint argument `I`, a task. Positions are compiled in: the verifier allows only
/// constant-offset context loads within the prototype's arguments (`sched_process_exit` has
/// one before 6.16), and a position chosen at run time becomes a computed address, which it
/// refuses. The loader checks each position against the kernel's BTF before loading.
#[inline(always)]
fn task_arg<const I: usize>(ctx: &BtfTracePointContext) -> Option<Task> {
    // SAFETY: the loader checked that argument `I` is a `struct task_struct *` here, and a
    // tp_btf argument of that type is BTF-typed for the verifier.
    unsafe { Task::new(ctx.arg::<u64>(I)) }
}

#[btf_tracepoint(function = "sched_process_fork")]
pub fn sched_process_fork(ctx: BtfTracePointContext) -> i32 {
    let Some(slice) = slice() else { return 0 };
    let Some(child) = task_arg::<1>(&ctx) else { return 0 };
    // A new thread of the same process is not a new process.
    if child.tid() != child.tgid() {
        return 0;
    }
    // The child is still in its parent's cgroups.
    let Some(worker) = child.worker(slice) else { return 0 };
    let parent = task_arg::<0>(&ctx).map_or(0, |p| p.tgid());
    if let Some(c) = process_counts(&ctx, worker) {
        c.forked += 1;
    }
    emit(TaskEventKind::Fork, 0, parent, child, worker, None);
    0
}

#[btf_tracepoint(function = "sched_process_exec")]
pub fn sched_process_exec(ctx: BtfTracePointContext) -> i32 {
    let Some(slice) = slice() else { return 0 };
    let Some(task) = task_arg::<0>(&ctx) else { return 0 };
    let Some(worker) = task.worker(slice) else { return 0 };
    if let Some(c) = process_counts(&ctx, worker) {
        c.execs += 1;
    }
    emit(TaskEventKind::Exec, 0, 0, task, worker, None);
    0
}

#[btf_tracepoint(function = "sched_process_exit")]
pub fn sched_process_exit(ctx: BtfTracePointContext) -> i32 {
    let Some(slice) = slice() else { return 0 };
    let Some(task) = task_arg::<0>(&ctx) else { return 0 };
    let Some(worker) = task.worker(slice) else { return 0 };
    // `group_dead` is argument 1 from 6.16; the verifier never sees this load before.
    let process_ends = match layout!(exit_group_dead) {
        MISSING => task.tid() == task.tgid(),
        _ => ctx.arg::<u64>(1) & 0xff != 0,
    };
    if process_ends {
        if let Some(c) = process_counts(&ctx, worker) {
            c.exited += 1;
        }
    }
    // The task is running here: with the clock offset its uncharged time is known too.
    let sched_now = clock_offset().map(sched_now);
    emit(TaskEventKind::Exit, if process_ends { EXIT_PROCESS } else { 0 }, 0, task, worker, sched_now);
    0
}

#[btf_tracepoint(function = "sched_process_free")]
pub fn sched_process_free(ctx: BtfTracePointContext) -> i32 {
    let Some(slice) = slice() else { return 0 };
    let Some(task) = task_arg::<0>(&ctx) else { return 0 };
    // A freed task keeps its cgroups until the very end, and never runs again.
    let Some(worker) = task.worker(slice) else { return 0 };
    emit(TaskEventKind::Free, 0, 0, task, worker, None);
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
    let Some(task) = task_arg::<2>(&ctx) else { return 0 };
    // Its v2 cgroup after the move (a v1 move leaves it as it was).
    let worker = task.worker(slice).unwrap_or(0);
    emit(TaskEventKind::Moved, 0, 0, task, worker, None);
    0
}
