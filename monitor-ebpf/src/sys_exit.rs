//! `sys_exit` (raw_syscalls): bytes moved by read- and write-type system calls, the
//! `rchar`/`wchar` of `/proc/<pid>/io`, counted when the call returns what it moved. Every
//! system call on the host passes here, so the call number is checked first.
use aya_ebpf::{helpers::bpf_get_current_task_btf, macros::btf_tracepoint, programs::BtfTracePointContext};
use monitor_common::IoSyscalls;

use crate::{
    kernel::{arg, field, layout, worker_cached},
    maps::{counters, current, slice},
};

/// Filled in by the loader with this architecture's numbers.
#[unsafe(no_mangle)]
static IO_SYSCALLS: IoSyscalls =
    IoSyscalls { read: [u32::MAX; 5], write: [u32::MAX; 5], both: [u32::MAX; 2] };

#[inline(always)]
fn listed<const N: usize>(list: &'static [u32; N], nr: u32) -> bool {
    let mut i = 0;
    while i < N {
        if unsafe { core::ptr::read_volatile(&list[i]) } == nr {
            return true;
        }
        i += 1;
    }
    false
}

#[btf_tracepoint(function = "sys_exit")]
pub fn sys_exit(ctx: BtfTracePointContext) -> i32 {
    let ret = arg::<2>(&ctx, layout!(sys_exit_ret)) as i64;
    if ret <= 0 {
        return 0;
    }
    let regs = arg::<2>(&ctx, layout!(sys_exit_regs));
    let nr = field::<u64>(regs, layout!(pt_regs_syscall_nr)) as u32;
    let both = listed(&IO_SYSCALLS.both, nr);
    let read = both || listed(&IO_SYSCALLS.read, nr);
    let write = both || listed(&IO_SYSCALLS.write, nr);
    if !read && !write {
        return 0;
    }
    let Some(slice) = slice() else { return 0 };
    let task = unsafe { bpf_get_current_task_btf() } as u64;
    let worker = worker_cached(current().as_deref(), task, slice);
    if worker == 0 {
        return 0;
    }
    if let Some(c) = counters(&ctx, worker) {
        if read {
            c.syscall_read_bytes += ret as u64;
        }
        if write {
            c.syscall_write_bytes += ret as u64;
        }
    }
    0
}
