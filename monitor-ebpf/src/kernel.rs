//! Reading the kernel structures the probes need, at offsets the loader resolved from BTF.
//!
//! The programs are `tp_btf`, so their task arguments are BTF-typed pointers and the verifier
//! lets them load fields directly (a plain load with a fault handler, far cheaper than a
//! `bpf_probe_read_kernel` call) as long as each offset is a known constant and matches a
//! field of the right size. The offsets come from `LAYOUT`, a frozen read-only global, which
//! the verifier treats as constants.
use aya_ebpf::programs::BtfTracePointContext;
use monitor_common::{KernelLayout, SliceFilter, MAX_NESTING};

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
fn field<T: Copy>(base: u64, off: u32) -> T {
    unsafe { core::ptr::read_volatile((base as *const u8).add(off as usize).cast::<T>()) }
}

/// A pointer field; `None` (and counted) when NULL, as for a task being torn down.
#[inline(always)]
fn pointer(base: u64, off: u32) -> Option<u64> {
    let p: u64 = field(base, off);
    if p == 0 {
        if let Some(s) = stats() {
            s.read_errors += 1;
        }
        return None;
    }
    Some(p)
}

/// Tracepoint argument `n` (a position from `LAYOUT`). Context reads must use constant
/// offsets, hence the match rather than indexing; the verifier prunes the other arms.
#[inline(always)]
pub fn arg(ctx: &BtfTracePointContext, n: u32) -> u64 {
    match n {
        0 => ctx.arg(0),
        1 => ctx.arg(1),
        2 => ctx.arg(2),
        3 => ctx.arg(3),
        _ => 0,
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
