//! Reading the kernel structures the probes need, at offsets the loader resolved from BTF.
//!
//! The programs are `tp_btf`, so their task arguments are BTF-typed pointers and the verifier
//! lets them load fields directly (a plain load with a fault handler, far cheaper than a
//! `bpf_probe_read_kernel` call) as long as each offset is a known constant and matches a
//! field of the right size. The offsets come from `LAYOUT`, a frozen read-only global, which
//! the verifier treats as constants.
use aya_ebpf::programs::BtfTracePointContext;
use monitor_common::{CurrentTask, KernelLayout, SliceFilter, MAX_NESTING};

use crate::maps::stats;

/// Filled in by the loader before the program is loaded (`EbpfLoader::override_global`).
#[unsafe(no_mangle)]
pub(crate) static LAYOUT: KernelLayout = unsafe { core::mem::zeroed() };

/// One field of `LAYOUT`; volatile so the compiler cannot fold the zero it was compiled with.
macro_rules! layout {
    ($field:ident) => {
        unsafe { core::ptr::read_volatile(&raw const $crate::kernel::LAYOUT.$field) }
    };
}
pub(crate) use layout;

/// The field of type `T` at `base + off`. `base` must be a kernel pointer the verifier knows
/// by BTF type (a tracepoint argument or a pointer loaded from one).
#[inline(always)]
pub fn field<T: Copy>(base: u64, off: u32) -> T {
    unsafe { core::ptr::read_volatile((base as *const u8).add(off as usize).cast::<T>()) }
}

/// A pointer field; `None` (and counted) when NULL, as for a task being torn down.
#[inline(always)]
pub fn pointer(base: u64, off: u32) -> Option<u64> {
    let p: u64 = field(base, off);
    if p == 0 {
        if let Some(s) = stats() {
            s.read_errors += 1;
        }
        return None;
    }
    Some(p)
}

/// Tracepoint argument `n` (a position from `LAYOUT`) of a tracepoint with `N` arguments.
/// The verifier allows only constant-offset context loads, each within the prototype's
/// arguments, so all `N` are loaded at fixed offsets and `n` picks among the values; an
/// indexed load, which the compiler makes of a plain `match`, is refused.
#[inline(always)]
pub fn arg<const N: usize>(ctx: &BtfTracePointContext, n: u32) -> u64 {
    let mut args = [0u64; N];
    let mut i = 0;
    while i < N {
        args[i] = ctx.arg(i);
        i += 1;
    }
    if (n as usize) < N {
        args[n as usize]
    } else {
        0
    }
}

#[inline(always)]
pub fn task_tid(task: u64) -> u32 {
    field::<i32>(task, layout!(task_pid)) as u32
}

#[inline(always)]
pub fn task_cpu(task: u64) -> u32 {
    field(task, layout!(task_cpu))
}

/// The address of `task`'s `css_set`: it changes when the task moves to another cgroup.
#[inline(always)]
pub fn task_css_set(task: u64) -> u64 {
    field(task, layout!(task_cgroups))
}

/// `worker_of`, answered from the per-CPU cache when it holds this task in its cgroups of
/// then.
#[inline(always)]
pub fn worker_cached(cache: Option<&CurrentTask>, task: u64, slice: &SliceFilter) -> u64 {
    match cache {
        Some(c) if c.task == task && c.css_set == task_css_set(task) => c.worker,
        _ => worker_of(task, slice).unwrap_or(0),
    }
}

/// The v2 cgroup id of the worker `task` belongs to: the cgroup two levels below the slice
/// on its cgroup's path, found by walking the cgroup directories (kernfs nodes) upwards.
/// `None` for tasks outside the slice's workers; those sitting higher in the tree than a
/// worker could leave after three loads.
#[inline(always)]
pub fn worker_of(task: u64, slice: &SliceFilter) -> Option<u64> {
    let css_set = pointer(task, layout!(task_cgroups))?;
    let cgroup = pointer(css_set, layout!(css_set_dfl_cgrp))?;
    let level: i32 = field(cgroup, layout!(cgroup_level));
    let below_worker = level - (layout!(slice_level) as i32 + 2);
    if below_worker < 0 {
        return None;
    }
    if below_worker > MAX_NESTING as i32 {
        if let Some(s) = stats() {
            s.too_deep += 1;
        }
        return None;
    }
    let parent = layout!(kernfs_node_parent);
    let mut worker = pointer(cgroup, layout!(cgroup_kn))?;
    for i in 0..MAX_NESTING as i32 {
        if i >= below_worker {
            break;
        }
        worker = pointer(worker, parent)?;
    }
    let slice_node = pointer(pointer(worker, parent)?, parent)?;
    if field::<u64>(slice_node, layout!(kernfs_node_id)) != slice.id {
        return None;
    }
    Some(field(worker, layout!(kernfs_node_id)))
}
