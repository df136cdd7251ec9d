//! Turns the counters of the workers' tasks into per-worker totals. Every task's counters
//! only grow, and each reading of them (a pass of the task iterator, or the events of its
//! exit and of its end) is a snapshot: what a task adds between two snapshots goes to the
//! worker it is in at the second. A task is counted from zero if it was born since the
//! previous pass, else from when it is first seen (it was there before the monitor, or came
//! from outside the slice), so nothing that ran outside a worker is counted in it.
use monitor_common::{TaskCounters, TaskRecord};
use rustc_hash::FxHashMap;

/// Declares `Counters<T>`, one `T` per worker counter, with field-wise helpers, so that a
/// counter added here is carried by the ledger's totals and by the sample's totals and
/// rates without being named again.
macro_rules! counters {
    ($(#[$doc:meta])* pub struct $name:ident { $($(#[$fdoc:meta])* $field:ident,)* }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct $name<T> {
            $($(#[$fdoc])* pub $field: T,)*
        }

        impl<T> $name<T> {
            pub fn map<U>(self, mut f: impl FnMut(T) -> U) -> $name<U> {
                $name { $($field: f(self.$field),)* }
            }

            pub fn zip<U>(self, other: $name<U>) -> $name<(T, U)> {
                $name { $($field: (self.$field, other.$field),)* }
            }
        }
    };
}

counters! {
    /// One value per cumulative counter of a worker.
    pub struct Counters {
        /// Nanoseconds on a CPU, running tasks' uncharged time included.
        cpu_ns,
        /// Nanoseconds runnable but waiting for a CPU, and times a CPU was got.
        runq_wait_ns,
        runq_waits,
        /// Switches where the task gave up the CPU itself (blocked), and where it was preempted.
        voluntary_switches,
        involuntary_switches,
        /// Bytes through read- and write-type system calls (`rchar`/`wchar` semantics).
        syscall_read_bytes,
        syscall_write_bytes,
        /// Bytes read from storage, and bytes dirtied or written directly (`read_bytes`,
        /// `write_bytes` semantics).
        storage_read_bytes,
        storage_write_bytes,
        /// Processes forked, programs exec'd, processes ended.
        processes_forked,
        execs,
        processes_exited,
    }
}

/// Cumulative counters of one worker, as the loader keeps them.
pub type WorkerCounters = Counters<u64>;

impl WorkerCounters {
    /// The worker counters a task's counters add to (the process counts come from events).
    fn of_task(t: &TaskCounters) -> Self {
        Counters {
            cpu_ns: t.cpu_ns,
            runq_wait_ns: t.run_delay_ns,
            runq_waits: t.pcount,
            voluntary_switches: t.nvcsw,
            involuntary_switches: t.nivcsw,
            syscall_read_bytes: t.rchar,
            syscall_write_bytes: t.wchar,
            storage_read_bytes: t.read_bytes,
            storage_write_bytes: t.write_bytes,
            ..Default::default()
        }
    }
}

/// Each counter of `new` that is above `old`, by how much, and the larger of each.
fn growth(old: &TaskCounters, new: &TaskCounters) -> (TaskCounters, TaskCounters) {
    macro_rules! each {
        ($($f:ident),*) => {
            (
                TaskCounters { $($f: new.$f.saturating_sub(old.$f)),* },
                TaskCounters { $($f: new.$f.max(old.$f)),* },
            )
        };
    }
    each!(cpu_ns, run_delay_ns, pcount, nvcsw, nivcsw, rchar, wchar, read_bytes, write_bytes)
}

/// A task born this long before the previous pass began may still have been missed by it (it
/// was not yet visible to the iterator): it is counted from zero too.
const BIRTH_MARGIN_NS: u64 = 50_000_000;
/// A task neither seen nor ended for this many passes has left the slice, or its end was
/// lost; it is forgotten. One that has exited waits longer for its final counters: they come
/// an RCU grace period after it is reaped, which can take seconds on a busy host.
const FORGET_AFTER_PASSES: u64 = 3;
const FORGET_EXITED_AFTER_NS: u64 = 30_000_000_000;

struct TaskState {
    worker: u64,
    /// When it began to exit (CLOCK_MONOTONIC ns); its final counters are to come.
    exited_at: Option<u64>,
    /// What has been counted of it so far.
    counted: TaskCounters,
    /// The last pass that saw it.
    seen: u64,
}

#[derive(Default)]
pub struct Ledger {
    /// Looked up once per task record and event.
    tasks: FxHashMap<(u32, u64), TaskState>,
    totals: FxHashMap<u64, WorkerCounters>,
    /// Worker → what ended tasks were counted beyond their final counters (see `end`).
    owed: FxHashMap<u64, WorkerCounters>,
    /// CLOCK_MONOTONIC ns the previous pass began; `None` before the first.
    last_pass_ns: Option<u64>,
    pass: u64,
}

impl Ledger {
    /// Counts the iterator's snapshot of a task's counters in this pass.
    pub fn record(&mut self, r: &TaskRecord) {
        let pass = self.pass;
        self.count(r).seen = pass;
    }

    /// Counts a snapshot of a task's counters that an event carried. Only the iterator's
    /// sightings say a task is still there.
    pub fn note(&mut self, r: &TaskRecord) {
        self.count(r);
    }

    /// One lookup of the task, on every record of every pass.
    fn count(&mut self, r: &TaskRecord) -> &mut TaskState {
        let born = self.born_since_last_pass(r.start_ns);
        let pass = self.pass;
        let Self { tasks, totals, owed, .. } = self;
        let state = tasks.entry((r.tid, r.start_ns)).or_insert_with(|| TaskState {
            worker: r.worker,
            exited_at: None,
            counted: if born { TaskCounters::default() } else { r.counters },
            // A task first known from an event has not been seen by an iterator yet.
            seen: pass.saturating_sub(1),
        });
        let (grown, counted) = growth(&state.counted, &r.counters);
        (state.worker, state.counted) = (r.worker, counted);
        add(totals, owed, r.worker, &grown);
        state
    }

    /// A task moved to another cgroup, with its counters then: what it ran before goes to
    /// the worker it was in (if any), what it runs after to `r.worker` (if any).
    pub fn moved(&mut self, r: &TaskRecord) {
        let key = (r.tid, r.start_ns);
        match self.tasks.get_mut(&key) {
            Some(s) => {
                let (grown, counted) = growth(&s.counted, &r.counters);
                let worker = std::mem::replace(&mut s.worker, r.worker);
                s.counted = counted;
                if r.worker == 0 {
                    self.tasks.remove(&key);
                }
                add(&mut self.totals, &mut self.owed, worker, &grown);
            }
            // From outside (a worker's process is started outside and moves itself in): it
            // counts from its counters at the move.
            None if r.worker != 0 => {
                let state = TaskState {
                    worker: r.worker,
                    exited_at: None,
                    counted: r.counters,
                    seen: self.pass.saturating_sub(1),
                };
                self.tasks.insert(key, state);
            }
            None => {}
        }
    }

    /// Counts a task's counters as it begins to exit, at `at_ns`; its final ones are to come
    /// (`end`).
    pub fn exit(&mut self, r: &TaskRecord, at_ns: u64) {
        self.count(r).exited_at = Some(at_ns);
    }

    /// Tasks that have begun to exit, that this pass's iterator did not see (they were
    /// reaped) and whose final counters have not come yet. A zombie the iterator saw has its
    /// final counters already.
    pub fn awaiting_end(&self) -> usize {
        self.tasks.values().filter(|s| s.exited_at.is_some() && s.seen != self.pass).count()
    }

    /// Counts a task's final counters and forgets it. They are exact, unlike a running
    /// task's uncharged time, which counts scheduler-clock time the kernel does not charge
    /// (time a hypervisor stole): what was counted beyond them is owed, and the worker's next
    /// growth pays it back first, so that a total never goes back.
    pub fn end(&mut self, r: &TaskRecord) {
        self.note(r);
        if let Some(s) = self.tasks.remove(&(r.tid, r.start_ns)) {
            let (over, _) = growth(&r.counters, &s.counted);
            let owed = self.owed.entry(r.worker).or_default();
            *owed = owed.zip(WorkerCounters::of_task(&over)).map(|(o, d)| o + d);
        }
    }

    fn born_since_last_pass(&self, start_ns: u64) -> bool {
        self.last_pass_ns.is_some_and(|t| start_ns.saturating_add(BIRTH_MARGIN_NS) >= t)
    }

    /// Starts a pass of the iterator.
    pub fn begin_pass(&mut self) {
        self.pass += 1;
    }

    /// Ends a pass begun at `at_ns`: forgets tasks long unseen.
    pub fn end_pass(&mut self, at_ns: u64) {
        let pass = self.pass;
        self.tasks.retain(|_, s| match s.exited_at {
            Some(exited) => at_ns.saturating_sub(exited) < FORGET_EXITED_AFTER_NS,
            None => pass - s.seen < FORGET_AFTER_PASSES,
        });
        self.last_pass_ns = Some(at_ns);
    }

    pub fn totals(&self) -> &FxHashMap<u64, WorkerCounters> {
        &self.totals
    }

    pub fn totals_mut(&mut self, worker: u64) -> &mut WorkerCounters {
        self.totals.entry(worker).or_default()
    }

    /// Forgets a worker whose cgroup is gone, and its tasks.
    pub fn forget(&mut self, worker: u64) {
        self.totals.remove(&worker);
        self.owed.remove(&worker);
        self.tasks.retain(|_, s| s.worker != worker);
    }

    /// Tasks being followed.
    pub fn tasks(&self) -> usize {
        self.tasks.len()
    }
}

/// Adds a task's growth to its worker's total, less what the worker owes.
fn add(
    totals: &mut FxHashMap<u64, WorkerCounters>,
    owed: &mut FxHashMap<u64, WorkerCounters>,
    worker: u64,
    grown: &TaskCounters,
) {
    let mut grown = WorkerCounters::of_task(grown);
    if let Some(o) = owed.get_mut(&worker) {
        let paid = o.zip(grown).map(|(o, g)| o.min(g));
        *o = o.zip(paid).map(|(o, p)| o - p);
        grown = grown.zip(paid).map(|(g, p)| g - p);
        if *o == WorkerCounters::default() {
            owed.remove(&worker);
        }
    }
    let total = totals.entry(worker).or_default();
    *total = total.zip(grown).map(|(t, g)| t + g);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(worker: u64, tid: u32, start_ns: u64, cpu_ns: u64) -> TaskRecord {
        TaskRecord {
            worker,
            start_ns,
            tid,
            tgid: tid,
            flags: 0,
            _pad: 0,
            counters: TaskCounters { cpu_ns, rchar: cpu_ns / 2, ..Default::default() },
        }
    }

    fn pass(l: &mut Ledger, at: u64, records: &[TaskRecord]) {
        l.begin_pass();
        for r in records {
            l.record(r);
        }
        l.end_pass(at);
    }

    #[test]
    fn tasks_present_at_start_count_from_then() {
        let mut l = Ledger::default();
        pass(&mut l, 1_000_000_000, &[rec(7, 10, 5, 900)]);
        assert_eq!(l.totals()[&7].cpu_ns, 0);
        pass(&mut l, 2_000_000_000, &[rec(7, 10, 5, 1_400)]);
        assert_eq!(l.totals()[&7].cpu_ns, 500);
        assert_eq!(l.totals()[&7].syscall_read_bytes, 250);
    }

    #[test]
    fn a_task_born_and_ended_between_passes_counts_whole() {
        let mut l = Ledger::default();
        pass(&mut l, 1_000_000_000, &[]);
        l.exit(&rec(7, 11, 1_200_000_000, 300), 1_300_000_000);
        l.begin_pass();
        assert_eq!(l.awaiting_end(), 1);
        l.end(&rec(7, 11, 1_200_000_000, 320));
        assert_eq!(l.awaiting_end(), 0);
        l.end_pass(1_900_000_000);
        pass(&mut l, 2_000_000_000, &[]);
        assert_eq!(l.totals()[&7].cpu_ns, 320);
        assert_eq!(l.tasks(), 0);
    }

    #[test]
    fn a_task_moved_in_from_outside_counts_only_its_growth() {
        let mut l = Ledger::default();
        pass(&mut l, 1_000_000_000, &[]);
        pass(&mut l, 2_000_000_000, &[rec(7, 12, 100, 5_000)]);
        assert_eq!(l.totals()[&7].cpu_ns, 0);
        pass(&mut l, 3_000_000_000, &[rec(7, 12, 100, 5_100)]);
        assert_eq!(l.totals()[&7].cpu_ns, 100);
    }

    #[test]
    fn growth_goes_to_the_worker_the_task_is_in_now() {
        let mut l = Ledger::default();
        pass(&mut l, 1_000_000_000, &[rec(7, 13, 100, 1_000)]);
        pass(&mut l, 2_000_000_000, &[rec(8, 13, 100, 1_600)]);
        assert_eq!(l.totals()[&7].cpu_ns, 0);
        assert_eq!(l.totals()[&8].cpu_ns, 600);
    }

    #[test]
    fn a_reading_below_what_was_counted_adds_nothing_and_is_caught_up() {
        let mut l = Ledger::default();
        pass(&mut l, 1_000_000_000, &[rec(7, 14, 100, 1_000)]);
        pass(&mut l, 2_000_000_000, &[rec(7, 14, 100, 1_050)]); // in-flight estimate
        pass(&mut l, 3_000_000_000, &[rec(7, 14, 100, 1_040)]); // charged: a bit less
        assert_eq!(l.totals()[&7].cpu_ns, 50);
        pass(&mut l, 4_000_000_000, &[rec(7, 14, 100, 1_100)]);
        assert_eq!(l.totals()[&7].cpu_ns, 100);
    }

    #[test]
    fn an_ending_task_s_overshoot_is_paid_back_by_later_growth() {
        let mut l = Ledger::default();
        pass(&mut l, 1_000_000_000, &[]);
        l.record(&rec(7, 16, 1_500_000_000, 3_100)); // exit: 100 ns of it stolen, not charged
        l.end(&rec(7, 16, 1_500_000_000, 3_000));
        assert_eq!(l.totals()[&7].cpu_ns, 3_100, "a total never goes back");
        assert_eq!(l.totals()[&7].syscall_read_bytes, 1_550);
        // The next growth pays the overshoot back first.
        l.record(&rec(7, 18, 1_600_000_000, 70));
        assert_eq!(l.totals()[&7].cpu_ns, 3_100);
        l.record(&rec(7, 18, 1_600_000_000, 500));
        assert_eq!(l.totals()[&7].cpu_ns, 3_500);
        assert_eq!(l.totals()[&7].syscall_read_bytes, 1_750);
    }

    #[test]
    fn a_task_moved_in_counts_from_the_move() {
        let mut l = Ledger::default();
        pass(&mut l, 1_000_000_000, &[]);
        // Born since the last pass, outside: 150 ns ran before it joined worker 7.
        l.moved(&rec(7, 17, 1_100_000_000, 150));
        pass(&mut l, 2_000_000_000, &[rec(7, 17, 1_100_000_000, 1_150)]);
        assert_eq!(l.totals()[&7].cpu_ns, 1_000);
        l.forget(7);
        l.moved(&rec(7, 17, 100, 1_150));
        // Then it moves to worker 8, and out of the slice.
        l.moved(&rec(8, 17, 100, 1_200));
        l.moved(&rec(0, 17, 100, 1_500));
        assert_eq!((l.totals()[&7].cpu_ns, l.totals()[&8].cpu_ns), (50, 300));
        assert_eq!(l.tasks(), 0);
    }

    #[test]
    fn unseen_tasks_are_forgotten() {
        let mut l = Ledger::default();
        pass(&mut l, 1_000_000_000, &[rec(7, 15, 100, 1_000)]);
        for i in 2..6 {
            pass(&mut l, i * 1_000_000_000, &[]);
        }
        assert_eq!(l.tasks(), 0);
    }
}
