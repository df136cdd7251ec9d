//! hive-monitor's kernel probes. Nothing runs per context switch, system call or I/O: the
//! kernel already keeps every figure per task (CPU time, run-queue wait, switches, I/O
//! bytes), so once per interval the loader runs `task_counters`, a task iterator that copies
//! those counters for the slice's tasks, and per task lifetime the lifecycle probes keep
//! what an exiting task takes with it. The lifecycle probes are `tp_btf` tracepoints
//! (fentry and kprobes are not available on every target kernel).
#![no_std]
#![no_main]

mod kernel;
mod lifecycle;
mod maps;
mod task_counters;

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program with a reachable panic path.
    unsafe { core::hint::unreachable_unchecked() }
}
