//! `task_counters`, a task iterator (`iter/task`): once per interval the loader reads it, and
//! for every task of a worker it writes an `IterRecord`: the counters the kernel itself keeps
//! in the task and, for a process's leader, the process's resident pages. Its cost is one
//! pass over the host's tasks per interval, however busy they are.
//!
//! aya-ebpf has no macro for iterators, so the program is declared by its section by hand.
use core::ffi::c_void;

use aya_ebpf::helpers::generated::bpf_seq_write;
use monitor_common::{
    IterRecord, ProcessMemory, TASK_HAS_MEMORY, TASK_HAS_MEMORY_CGROUP, TASK_MEMORY_UNREADABLE,
};

use crate::{
    kernel::{self, Memory},
    maps::{find_cpu_offsets, set_clock_offset, slice},
};

/// The session whose clock offset `OFFSET` holds: each read of a new iterator is a new
/// session, and its first task measures the offset once.
static mut SESSION: u64 = 0;
static mut OFFSET: u64 = 0;
/// Whether this session found the CPUs' per-CPU offsets, which processes' memory needs on
/// kernels whose memory counters are per-CPU (from 6.2).
static mut CPU_OFFSETS_FOUND: bool = false;

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
    let (offset, cpu_offsets) = unsafe {
        if SESSION != session {
            SESSION = session;
            OFFSET = kernel::clock_offset().unwrap_or(0);
            if OFFSET != 0 {
                set_clock_offset(OFFSET);
            }
            CPU_OFFSETS_FOUND = find_cpu_offsets().is_some();
        }
        (OFFSET, CPU_OFFSETS_FOUND)
    };
    let Some(slice) = slice() else { return 0 };
    let Some(worker) = task.worker(slice) else { return 0 };
    let sched_now = (offset != 0).then(|| kernel::sched_now(offset));
    let mut record = core::mem::MaybeUninit::<IterRecord>::uninit();
    // SAFETY: fill_record writes every member of the task's record, and the memory and
    // memory cgroup members are written just below.
    let record = unsafe {
        let r = &mut *record.as_mut_ptr();
        task.fill_record(&mut r.task, worker, sched_now);
        let (flag, m) = match task.memory(cpu_offsets) {
            Memory::Read(m) => (TASK_HAS_MEMORY, m),
            Memory::Unreadable => (TASK_MEMORY_UNREADABLE, ProcessMemory::default()),
            Memory::None => (0, ProcessMemory::default()),
        };
        r.task.flags |= flag;
        (r.memory.file_pages, r.memory.anon_pages, r.memory.shmem_pages) =
            (m.file_pages, m.anon_pages, m.shmem_pages);
        let cg = &mut r.memory_cgroup;
        (cg.id, cg.usage_pages, cg.watermark_pages, cg.max_pages, cg.oom_kills) = (0, 0, 0, 0, 0);
        if r.task.tid == r.task.tgid && task.memory_cgroup(cg) {
            r.task.flags |= TASK_HAS_MEMORY_CGROUP;
        }
        record.assume_init_ref()
    };
    let seq = meta.seq();
    // SAFETY: `seq` is the iterator's seq_file, and the record is plain data of that length.
    unsafe {
        bpf_seq_write(
            seq,
            (record as *const IterRecord).cast::<c_void>(),
            core::mem::size_of::<IterRecord>() as u32,
        );
    }
    0
}
