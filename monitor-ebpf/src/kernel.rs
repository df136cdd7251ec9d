//! Reading the kernel structures the probes need, at offsets the loader resolved from BTF.
use aya_ebpf::helpers::bpf_probe_read_kernel;
use monitor_common::{KernelLayout, SliceFilter};

use crate::maps::stats;

/// Filled in by the loader before the program is loaded (`EbpfLoader::set_global`).
#[unsafe(no_mangle)]
pub(crate) static LAYOUT: KernelLayout = unsafe { core::mem::zeroed() };

/// One field of `LAYOUT`; volatile so the compiler cannot fold the zero it was compiled with.
macro_rules! layout {
    ($field:ident) => {
        unsafe { core::ptr::read_volatile(&raw const $crate::kernel::LAYOUT.$field) }
    };
}
pub(crate) use layout;

/// Reads a `T` at `base + off` in kernel memory, counting failures.
#[inline(always)]
pub fn read<T>(base: u64, off: u32) -> Option<T> {
    match unsafe { bpf_probe_read_kernel((base + off as u64) as *const T) } {
        Ok(v) => Some(v),
        Err(_) => {
            if let Some(s) = stats() {
                s.read_errors += 1;
            }
            None
        }
    }
}

/// Raw tracepoint argument `n` (a position from `LAYOUT`). Context reads must use constant
/// offsets, hence the match rather than indexing.
#[inline(always)]
pub fn arg(ctx: &aya_ebpf::programs::RawTracePointContext, n: u32) -> u64 {
    match n {
        0 => ctx.arg(0),
        1 => ctx.arg(1),
        2 => ctx.arg(2),
        3 => ctx.arg(3),
        4 => ctx.arg(4),
        _ => 0,
    }
}

#[inline(always)]
pub fn task_tid(task: u64) -> Option<u32> {
    read::<i32>(task, layout!(task_pid)).map(|pid| pid as u32)
}

#[inline(always)]
pub fn task_cpu(task: u64) -> Option<u32> {
    read::<u32>(task, layout!(task_cpu))
}

#[inline(always)]
fn cgroup_id(cgroup: u64) -> Option<u64> {
    let kn: u64 = read(cgroup, layout!(cgroup_kn))?;
    read(kn, layout!(kernfs_node_id))
}

/// The v2 cgroup id of the worker `task` belongs to: its cgroup's ancestor two levels below
/// the slice. `None` for tasks outside the slice's workers, which leave after three reads
/// when they sit higher in the tree than a worker could.
#[inline(always)]
pub fn worker_of(task: u64, slice: &SliceFilter) -> Option<u64> {
    let css_set: u64 = read(task, layout!(task_cgroups))?;
    let cgroup: u64 = read(css_set, layout!(css_set_dfl_cgrp))?;
    let level: i32 = read(cgroup, layout!(cgroup_level))?;
    let worker_level = slice.level + 2;
    if level < worker_level as i32 {
        return None;
    }
    let ancestors = layout!(cgroup_ancestors);
    let in_slice: u64 = read(cgroup, ancestors + slice.level * 8)?;
    if cgroup_id(in_slice)? != slice.id {
        return None;
    }
    let worker: u64 = read(cgroup, ancestors + worker_level * 8)?;
    cgroup_id(worker)
}
