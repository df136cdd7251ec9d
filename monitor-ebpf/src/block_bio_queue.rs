//! `block_bio_queue`: what a worker's task submits to a block device. Reads are the bytes
//! `read_bytes` counts (the kernel's `task_io_account_read()` in `submit_bio()`): cache
//! misses, readahead, faults on mapped files, direct reads. Writes count only when direct:
//! a bio of page-cache pages under writeback carries pages already counted when dirtied
//! (`writeback_dirty_folio`), as the kernel counts `write_bytes`.
use aya_ebpf::{
    helpers::{bpf_get_current_task_btf, bpf_probe_read_kernel},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};

use crate::{
    kernel::{arg, field, layout, worker_cached},
    maps::{counters, current, slice},
};

/// The operation in the low byte of `bi_opf`.
const REQ_OP_MASK: u32 = 0xff;
const REQ_OP_READ: u32 = 0;
const REQ_OP_WRITE: u32 = 1;

#[btf_tracepoint(function = "block_bio_queue")]
pub fn block_bio_queue(ctx: BtfTracePointContext) -> i32 {
    let Some(slice) = slice() else { return 0 };
    let bio = arg::<1>(&ctx, layout!(bio_queue_bio));
    let op = field::<u32>(bio, layout!(bio_opf)) & REQ_OP_MASK;
    if op != REQ_OP_READ && op != REQ_OP_WRITE {
        return 0;
    }
    let task = unsafe { bpf_get_current_task_btf() } as u64;
    // A stacked driver (dm, md) passing a bio on: its submitter was counted already.
    if field::<u64>(task, layout!(task_bio_list)) != 0 {
        return 0;
    }
    let worker = worker_cached(current().as_deref(), task, slice);
    if worker == 0 {
        return 0;
    }
    let size = u64::from(field::<u32>(bio, layout!(bio_size)));
    if op == REQ_OP_WRITE && !direct(bio) {
        return 0;
    }
    if let Some(c) = counters(&ctx, worker) {
        if op == REQ_OP_READ {
            c.storage_read_bytes += size;
        } else {
            c.storage_write_bytes += size;
        }
    }
    0
}

/// Whether a write bio is direct I/O: its first page is not a page-cache page being
/// written back (`PG_writeback` on its folio), which every writeback bio's pages are.
#[inline(always)]
fn direct(bio: u64) -> bool {
    if field::<u16>(bio, layout!(bio_vcnt)) == 0 {
        return false;
    }
    let vec: u64 = field(bio, layout!(bio_io_vec));
    if vec == 0 {
        return false;
    }
    let page: u64 = field(vec, layout!(bio_vec_page));
    if page == 0 {
        return false;
    }
    // A tail page of a large folio: the flags live in the head, `compound_head - 1`. The
    // word shares a union with `lru` pointers, so it is read as a plain number.
    let read = |at: u64| unsafe { bpf_probe_read_kernel(at as *const u64) }.ok();
    let Some(head) = read(page + u64::from(layout!(page_compound_head))) else { return false };
    let flags: u64 = if head & 1 != 0 {
        let Some(f) = read(head - 1 + u64::from(layout!(page_flags))) else { return false };
        f
    } else {
        field(page, layout!(page_flags))
    };
    flags & (1 << layout!(pg_writeback)) == 0
}
