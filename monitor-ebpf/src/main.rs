//! hive-monitor's kernel probes: one module per kernel event (context switch, CPU charge,
//! process fork/exec/exit), all attached as `tp_btf` tracepoints (fentry/kprobes are not
//! available on the target kernels, see SPEC §3). Only tasks inside the watched slice are
//! counted, per worker cgroup, in per-CPU maps. Run-queue wait and I/O are the kernel's own
//! per-task figures, added to the worker as they grow while the task is on a CPU.
#![no_std]
#![no_main]

mod kernel;
mod lifecycle;
mod maps;
mod sched_stat_runtime;
mod sched_switch;

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program with a reachable panic path.
    unsafe { core::hint::unreachable_unchecked() }
}
