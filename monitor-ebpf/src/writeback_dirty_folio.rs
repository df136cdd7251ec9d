//! `writeback_dirty_folio`: a worker's task dirtied a page-cache folio, the moment the
//! kernel counts `write_bytes` (`folio_account_dirtied()`, which fires this tracepoint and
//! then counts the folio's pages when the file system writes back, i.e. not tmpfs). The
//! flusher that writes the pages later is not the worker and is not counted.
use aya_ebpf::{helpers::bpf_get_current_task_btf, macros::btf_tracepoint, programs::BtfTracePointContext};

use crate::{
    kernel::{arg, field, layout, pointer, worker_cached},
    maps::{counters, current, slice},
};

/// `BDI_CAP_WRITEBACK` in `backing_dev_info.capabilities` (a `#define`, absent from BTF).
const BDI_CAP_WRITEBACK: u32 = 1;
/// `BDEVFS_MAGIC` (uapi): a block device's own page cache, whose dirty pages are written
/// back to that device (`inode_to_bdi()` takes its disk's bdi, not the superblock's).
const BDEVFS_MAGIC: u64 = 0x6264_6576;

#[btf_tracepoint(function = "writeback_dirty_folio")]
pub fn writeback_dirty_folio(ctx: BtfTracePointContext) -> i32 {
    let Some(slice) = slice() else { return 0 };
    let task = unsafe { bpf_get_current_task_btf() } as u64;
    let worker = worker_cached(current().as_deref(), task, slice);
    if worker == 0 {
        return 0;
    }
    // The verifier knows `mapping` may be NULL here and wants that ruled out before use.
    let (folio, mapping) = (arg::<2>(&ctx, layout!(dirty_folio)), arg::<2>(&ctx, layout!(dirty_mapping)));
    if folio == 0 || mapping == 0 || !can_writeback(mapping).unwrap_or(false) {
        return 0;
    }
    let flags: u64 = field(folio, layout!(page_flags));
    let pages =
        if flags & (1 << layout!(pg_head)) != 0 { field::<u32>(folio, layout!(folio_nr_pages)) } else { 1 };
    if let Some(c) = counters(&ctx, worker) {
        c.storage_write_bytes += u64::from(pages) * u64::from(layout!(page_size));
    }
    0
}

/// `mapping_can_writeback()`: the backing device of the mapping's file writes pages back.
#[inline(always)]
fn can_writeback(mapping: u64) -> Option<bool> {
    let inode = pointer(mapping, layout!(mapping_host))?;
    let sb = pointer(inode, layout!(inode_sb))?;
    if field::<u64>(sb, layout!(sb_magic)) == BDEVFS_MAGIC {
        return Some(true);
    }
    let bdi = pointer(sb, layout!(sb_bdi))?;
    Some(field::<u32>(bdi, layout!(bdi_capabilities)) & BDI_CAP_WRITEBACK != 0)
}
