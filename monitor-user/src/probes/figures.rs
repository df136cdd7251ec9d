//! Which figure depends on which programs and kernel members: the one place that says it.
//! A program that cannot be loaded, or a member this kernel lacks, costs exactly the figures
//! listed against it here; every other figure stays exact.
use std::collections::BTreeMap;

use super::layout::{self, Member, Missing};

/// The task iterator and the lifecycle tracepoints (see `monitor-ebpf`).
pub const TASK_COUNTERS: &str = "task_counters";
pub const FORK: &str = "sched_process_fork";
pub const EXEC: &str = "sched_process_exec";
pub const EXIT: &str = "sched_process_exit";
pub const FREE: &str = "sched_process_free";
pub const ATTACH: &str = "cgroup_attach_task";
pub const PROGRAMS: [&str; 6] = [TASK_COUNTERS, FORK, EXEC, EXIT, FREE, ATTACH];

/// Members every program reads to find a task's worker.
const CORE: [&str; 10] = [
    "task_struct.pid",
    "task_struct.tgid",
    "task_struct.cgroups",
    "task_struct.start_time",
    "task_struct.flags",
    "css_set.dfl_cgrp",
    "cgroup.level",
    "cgroup.kn",
    "kernfs_node.id",
    "kernfs_node.parent",
];

/// What one program needs beyond `CORE`: its attach point and context members, and the
/// helpers it calls that not every kernel has.
pub fn program_needs(program: &str) -> &'static [&'static str] {
    match program {
        TASK_COUNTERS => &["bpf_iter__task.meta", "bpf_iter__task.task", "helper:bpf_seq_write"],
        FORK => &[FORK, "sched_process_fork.parent", "sched_process_fork.child", "helper:bpf_ringbuf_output"],
        EXEC => &[EXEC, "sched_process_exec.p", "helper:bpf_ringbuf_output"],
        EXIT => &[EXIT, "sched_process_exit.p", "sched_process_exit.group_dead", "helper:bpf_ringbuf_output"],
        FREE => &[FREE, "sched_process_free.p", "helper:bpf_ringbuf_output"],
        ATTACH => &[ATTACH, "cgroup_attach_task.task", "helper:bpf_ringbuf_output"],
        _ => &[],
    }
}

/// Every name a program needs, `CORE` first.
pub fn all_needs(program: &str) -> impl Iterator<Item = &'static str> {
    CORE.into_iter().chain(program_needs(program).iter().copied())
}

/// A figure of the heartbeat the probes measure, by its `collector` name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Figure {
    /// `cpu_pct`, `cpu_ns_total`
    Cpu,
    /// `runq_wait_pct`, `runq_wait_ns_total`, `runq_waits_total`
    Runq,
    /// `ctx_switches_*_total`
    CtxSwitches,
    /// `io_syscall_*`
    IoSyscall,
    /// `io_r_mb_s`, `io_read_bytes_total`
    IoRead,
    /// `io_w_mb_s`, `io_write_bytes_total`
    IoWrite,
    ProcessesForked,
    Execs,
    ProcessesExited,
}

/// A task's counters are exact only with all four: the iterator for live tasks, the exit
/// and free probes for what a task ran between the last pass and its end, and the cgroup
/// move probe for where its growth belongs when it joins or leaves a worker.
const TASK_PROGRAMS: &[&str] = &[TASK_COUNTERS, EXIT, FREE, ATTACH];

impl Figure {
    pub const ALL: [Figure; 9] = [
        Figure::Cpu,
        Figure::Runq,
        Figure::CtxSwitches,
        Figure::IoSyscall,
        Figure::IoRead,
        Figure::IoWrite,
        Figure::ProcessesForked,
        Figure::Execs,
        Figure::ProcessesExited,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Figure::Cpu => "cpu",
            Figure::Runq => "runq",
            Figure::CtxSwitches => "ctx_switches",
            Figure::IoSyscall => "io_syscall",
            Figure::IoRead => "io_read",
            Figure::IoWrite => "io_write",
            Figure::ProcessesForked => "processes_forked",
            Figure::Execs => "execs",
            Figure::ProcessesExited => "processes_exited",
        }
    }

    /// The programs and members this figure reads.
    fn needs(self) -> (&'static [&'static str], Vec<&'static Member>) {
        let uncharged = || layout::UNCHARGED.iter();
        match self {
            Figure::Cpu => (TASK_PROGRAMS, [&layout::SUM_EXEC_RUNTIME].into_iter().chain(uncharged()).collect()),
            Figure::Runq => (TASK_PROGRAMS, layout::RUN_DELAY.iter().collect()),
            Figure::CtxSwitches => (TASK_PROGRAMS, layout::SWITCHES.iter().collect()),
            Figure::IoSyscall => (TASK_PROGRAMS, layout::SYSCALL_IO.iter().collect()),
            Figure::IoRead => (TASK_PROGRAMS, vec![&layout::READ_BYTES]),
            Figure::IoWrite => (TASK_PROGRAMS, vec![&layout::WRITE_BYTES]),
            Figure::ProcessesForked => (&[FORK], vec![]),
            Figure::Execs => (&[EXEC], vec![]),
            Figure::ProcessesExited => (&[EXIT], vec![]),
        }
    }
}

/// Whether a program runs, and if not, why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProgramStatus {
    Attached,
    Unavailable(String),
}

/// Each figure: measured by the probes, or why not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Availability(BTreeMap<Figure, Result<(), String>>);

impl Availability {
    pub fn new(programs: &[(&'static str, ProgramStatus)], missing: &Missing) -> Self {
        let figures = Figure::ALL.into_iter().map(|f| {
            let (needed_programs, members) = f.needs();
            let why_program = needed_programs.iter().find_map(|p| {
                match programs.iter().find(|(name, _)| name == p).map(|(_, s)| s) {
                    Some(ProgramStatus::Attached) => None,
                    Some(ProgramStatus::Unavailable(why)) => Some(format!("unavailable: program {p}: {why}")),
                    None => Some(format!("unavailable: program {p} not loaded")),
                }
            });
            let why_member = || {
                members.iter().find_map(|m| {
                    missing.get(m.name()).map(|why| format!("unavailable: no {} ({why})", m.name()))
                })
            };
            (f, why_program.or_else(why_member).map_or(Ok(()), Err))
        });
        Self(figures.collect())
    }

    /// No figure at all: the probes are not loaded.
    pub fn none(why: &str) -> Self {
        Self(Figure::ALL.into_iter().map(|f| (f, Err(format!("unavailable: {why}")))).collect())
    }

    pub fn has(&self, f: Figure) -> bool {
        matches!(self.0.get(&f), Some(Ok(())))
    }

    /// The figures not measured, by name, with the reason.
    pub fn missing(&self) -> impl Iterator<Item = (Figure, &str)> {
        self.0.iter().filter_map(|(f, r)| r.as_ref().err().map(|why| (*f, why.as_str())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attached() -> Vec<(&'static str, ProgramStatus)> {
        PROGRAMS.iter().map(|p| (*p, ProgramStatus::Attached)).collect()
    }

    #[test]
    fn everything_attached_and_resolved_leaves_nothing_out() {
        let a = Availability::new(&attached(), &Missing::new());
        assert_eq!(a.missing().count(), 0);
    }

    #[test]
    fn a_missing_member_costs_only_its_figure() {
        let missing = Missing::from([("task_struct.ioac.write_bytes".to_string(), "no such member".to_string())]);
        let a = Availability::new(&attached(), &missing);
        let out: Vec<_> = a.missing().collect();
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].0, Figure::IoWrite);
        assert!(out[0].1.contains("task_struct.ioac.write_bytes"), "{}", out[0].1);
    }

    #[test]
    fn a_failed_program_costs_the_figures_that_need_it() {
        let mut programs = attached();
        programs[4].1 = ProgramStatus::Unavailable("verifier refused it".into()); // sched_process_free
        let a = Availability::new(&programs, &Missing::new());
        let out: Vec<Figure> = a.missing().map(|(f, _)| f).collect();
        assert_eq!(
            out,
            [Figure::Cpu, Figure::Runq, Figure::CtxSwitches, Figure::IoSyscall, Figure::IoRead, Figure::IoWrite]
        );
        assert!(a.has(Figure::ProcessesExited) && a.has(Figure::ProcessesForked));
    }
}
