//! `task_counters`, a task iterator (`iter/task`): once per interval the loader reads it, and
//! for every task of a worker it writes a `TaskRecord`, the counters the kernel itself keeps
//! in the task. Its cost is one pass over the host's tasks per interval, however busy they are.
//!
//! aya-ebpf has no macro for iterators, so the program is declared by its section by hand.
use core::ffi::c_void;

use aya_ebpf::helpers::generated::bpf_seq_write;
use monitor_common::TaskRecord;

use crate::{
    kernel,
    maps::{set_clock_offset, slice},
};

/// The session whose clock offset `OFFSET` holds: each read of a new iterator is a new
/// session, and its first task measures the offset once.
static mut SESSION: u64 = 0;
static mut OFFSET: u64 = 0;

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task")]
pub fn task_counters(ctx: *mut c_void) -> i32 {
    // SAFETY: this is an `iter/task` program, and the loader checked that its context is
    // `bpf_iter__task { meta@0, task@8 }` before loading it.
    let Some((meta, task)) = (unsafe { kernel::task_iter_args(ctx) }) else { return 0 };
    // Measured at the first task, just after the loader yielded the CPU (see `clock_offset`).
    let session = meta.session_id();
    // SAFETY: one iteration runs on one CPU at a time, and only the loader's sampler reads
    // the iterator, so these plain globals are not raced.
    let offset = unsafe {
        if SESSION != session {
            SESSION = session;
            OFFSET = kernel::clock_offset().unwrap_or(0);
            if OFFSET != 0 {
                set_clock_offset(OFFSET);
            }
        }
        OFFSET
    };
    let Some(slice) = slice() else { return 0 };
    let Some(worker) = task.worker(slice) else { return 0 };
    let sched_now = (offset != 0).then(|| kernel::sched_now(offset));
    let mut record = core::mem::MaybeUninit::<TaskRecord>::uninit();
    // SAFETY: fill_record writes every member of the record.
    let record = unsafe {
        task.fill_record(&mut *record.as_mut_ptr(), worker, sched_now);
        record.assume_init_ref()
    };
    let seq = meta.seq();
    // SAFETY: `seq` is the iterator's seq_file, and the record is plain data of that length.
    unsafe {
        bpf_seq_write(
            seq,
            (record as *const TaskRecord).cast::<c_void>(),
            core::mem::size_of::<TaskRecord>() as u32,
        );
    }
    0
}
