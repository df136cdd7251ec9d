//! `block_bio_queue`: read requests a worker's task submits to a block device, the bytes
//! `read_bytes` counts (the kernel's `task_io_account_read()` in `submit_bio()`): cache
//! misses, readahead, faults on mapped files, direct reads. Counted for the submitting task.
use aya_ebpf::{helpers::bpf_get_current_task_btf, macros::btf_tracepoint, programs::BtfTracePointContext};

use crate::{
    kernel::{arg, field, layout, worker_cached},
    maps::{counters, current, slice},
};

/// `REQ_OP_READ` in the low byte of `bi_opf`.
const REQ_OP_MASK: u32 = 0xff;
const REQ_OP_READ: u32 = 0;

#[btf_tracepoint(function = "block_bio_queue")]
pub fn block_bio_queue(ctx: BtfTracePointContext) -> i32 {
    let Some(slice) = slice() else { return 0 };
    let bio = arg::<1>(&ctx, layout!(bio_queue_bio));
    if field::<u32>(bio, layout!(bio_opf)) & REQ_OP_MASK != REQ_OP_READ {
        return 0;
    }
    let task = unsafe { bpf_get_current_task_btf() } as u64;
    let worker = worker_cached(current().as_deref(), task, slice);
    if worker == 0 {
        return 0;
    }
    if let Some(c) = counters(&ctx, worker) {
        c.storage_read_bytes += u64::from(field::<u32>(bio, layout!(bio_size)));
    }
    0
}
