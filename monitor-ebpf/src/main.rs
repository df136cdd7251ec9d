//! hive-monitor's kernel probes: one module per kernel event (scheduler, system call, block
//! and page-cache I/O), all attached as `tp_btf` tracepoints (fentry/kprobes are not
//! available on the target kernels, see SPEC §3).
//! Only tasks inside the watched slice are counted, per worker cgroup, in per-CPU maps.
#![no_std]
#![no_main]

mod block_bio_queue;
mod kernel;
mod lifecycle;
mod maps;
mod sched_stat_runtime;
mod sched_switch;
mod sys_exit;
mod writeback_dirty_folio;

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program with a reachable panic path.
    unsafe { core::hint::unreachable_unchecked() }
}
