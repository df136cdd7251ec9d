//! `task_counters`, a task iterator (`iter/task`): once per interval the loader reads it, and
//! for every task of a worker it writes a `TaskRecord`, the counters the kernel itself keeps
//! in the task. Its cost is one pass over the host's tasks per interval, however busy they are.
//!
//! aya-ebpf has no macro for iterators, so the program is declared by its section by hand.
use core::ffi::c_void;

use aya_ebpf::{bindings::seq_file, helpers::generated::bpf_seq_write};
use monitor_common::TaskRecord;

use crate::{
    kernel::{self, KernelPtr, Task},
    maps::{set_clock_offset, slice},
};

/// `bpf_iter_meta.seq` and `.session_id`: fixed since iterators exist (5.8).
const META_SEQ: u32 = 0;
const META_SESSION: u32 = 8;

/// The session whose clock offset `OFFSET` holds: each read of a new iterator is a new
/// session, and its first task measures the offset once.
static mut SESSION: u64 = 0;
static mut OFFSET: u64 = 0;

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task")]
pub fn task_counters(ctx: *mut c_void) -> i32 {
    // SAFETY: the context is `bpf_iter__task { meta, task }` (the loader checked that layout);
    // the verifier allows only loads at constant offsets from it, and types both (meta, and
    // the task or NULL on the final call).
    let (meta, task) = unsafe {
        let args = ctx as *const [u64; 2];
        (core::ptr::read_volatile(&(*args)[0]), core::ptr::read_volatile(&(*args)[1]))
    };
    // SAFETY: both are BTF-typed pointers from the iterator's context.
    let (Some(meta), Some(task)) = (unsafe { KernelPtr::new(meta) }, unsafe { KernelPtr::new(task) }) else {
        return 0;
    };
    // Measured at the first task, just after the loader yielded the CPU (see `clock_offset`).
    let session: u64 = meta.field(META_SESSION);
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
    let task = Task(task);
    let Some(worker) = task.worker(slice) else { return 0 };
    let sched_now = (offset != 0).then(|| kernel::sched_now(offset));
    let mut record = core::mem::MaybeUninit::<TaskRecord>::uninit();
    // SAFETY: fill_record writes every member of the record.
    let record = unsafe {
        task.fill_record(&mut *record.as_mut_ptr(), worker, sched_now);
        record.assume_init_ref()
    };
    let seq: u64 = meta.field(META_SEQ);
    // SAFETY: `seq` is the iterator's seq_file, and the record is plain data of that length.
    unsafe {
        bpf_seq_write(
            seq as *mut seq_file,
            (record as *const TaskRecord).cast::<c_void>(),
            core::mem::size_of::<TaskRecord>() as u32,
        );
    }
    0
}
