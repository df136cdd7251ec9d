//! Resolves `KernelLayout` from the running kernel's BTF: the struct field offsets and
//! tracepoint argument positions the probes use, so nothing kernel-specific is compiled in.
use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::FromRawFd,
};

use btf_rs::{Btf, Type};
use monitor_common::{KernelLayout, MAX_CPUS, MISSING};

use crate::error::{Error, Result};

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// A member the probes read, under the name it is reported by (`struct.member.path`), with
/// every name it has had across the supported kernels, newest first.
pub struct Member {
    name: &'static str,
    strukt: &'static str,
    paths: &'static [&'static [&'static str]],
}

const fn member(
    name: &'static str,
    strukt: &'static str,
    paths: &'static [&'static [&'static str]],
) -> Member {
    Member { name, strukt, paths }
}

/// What this kernel's BTF lacks, by member or tracepoint name, with the reason.
pub type Missing = BTreeMap<String, String>;

/// The kernel layout, with what could not be resolved marked `MISSING` and listed.
#[derive(Debug)]
pub struct Resolved {
    pub layout: KernelLayout,
    pub missing: Missing,
}

/// Resolves every member and tracepoint argument the probes use. Nothing here fails for a
/// missing name: it is listed, and costs only the programs and figures that need it.
/// `withheld` names members and tracepoints to treat as missing (a test switch).
pub fn resolve(btf: &Btf, slice_level: u32, withheld: &BTreeSet<String>) -> Resolved {
    let mut r = Resolver { btf, withheld, missing: Missing::new() };
    let rss = r.rss_counters();
    let memcg = r.memory_cgroup();
    let fork = r.tracepoint("sched_process_fork");
    let exec = r.tracepoint("sched_process_exec");
    let exit = r.tracepoint("sched_process_exit");
    let free = r.tracepoint("sched_process_free");
    let attach = r.tracepoint("cgroup_attach_task");
    let task = task_ptr();
    let mut layout = KernelLayout {
        task_pid: r.member(&member("task_struct.pid", "task_struct", &[&["pid"]])),
        task_tgid: r.member(&member("task_struct.tgid", "task_struct", &[&["tgid"]])),
        task_cgroups: r.member(&member("task_struct.cgroups", "task_struct", &[&["cgroups"]])),
        task_start_time: r.member(&member("task_struct.start_time", "task_struct", &[&["start_time"]])),
        task_flags: r.member(&member("task_struct.flags", "task_struct", &[&["flags"]])),
        task_state: r.member(&TASK_STATE[0]),
        task_on_rq: r.member(&TASK_STATE[1]),
        css_set_dfl_cgrp: r.member(&member("css_set.dfl_cgrp", "css_set", &[&["dfl_cgrp"]])),
        cgroup_level: r.member(&member("cgroup.level", "cgroup", &[&["level"]])),
        cgroup_kn: r.member(&member("cgroup.kn", "cgroup", &[&["kn"]])),
        kernfs_node_id: r.member(&member("kernfs_node.id", "kernfs_node", &[&["id"]])),
        // Renamed in 6.15.
        kernfs_node_parent: r.member(&member(
            "kernfs_node.parent",
            "kernfs_node",
            &[&["__parent"], &["parent"]],
        )),
        task_sum_exec_runtime: r.member(&SUM_EXEC_RUNTIME),
        task_on_cpu: r.member(&UNCHARGED[0]),
        task_exec_start: r.member(&UNCHARGED[1]),
        task_cfs_rq: r.member(&UNCHARGED[2]),
        cfs_rq_rq: r.member(&UNCHARGED[3]),
        rq_clock: r.member(&UNCHARGED[4]),
        rq_clock_task: r.member(&UNCHARGED[5]),
        task_run_delay: r.member(&RUN_DELAY[0]),
        task_pcount: r.member(&RUN_DELAY[1]),
        task_nvcsw: r.member(&SWITCHES[0]),
        task_nivcsw: r.member(&SWITCHES[1]),
        task_rchar: r.member(&SYSCALL_IO[0]),
        task_wchar: r.member(&SYSCALL_IO[1]),
        task_read_bytes: r.member(&READ_BYTES),
        task_write_bytes: r.member(&WRITE_BYTES),
        iter_meta: r.member(&member("bpf_iter__task.meta", "bpf_iter__task", &[&["meta"]])),
        iter_task: r.member(&member("bpf_iter__task.task", "bpf_iter__task", &[&["task"]])),
        fork_parent: r.arg(&fork, "sched_process_fork.parent", &task, 0),
        fork_child: r.arg(&fork, "sched_process_fork.child", &task, 1),
        exec_task: r.arg(&exec, "sched_process_exec.p", &task, 0),
        exit_task: r.arg(&exit, "sched_process_exit.p", &task, 0),
        // Only from 6.16; the thread group leader's exit stands in before. Not missing.
        exit_group_dead: exit.as_ref().and_then(|t| t.nth(&ArgKind::Bool, 0)).unwrap_or(MISSING),
        free_task: r.arg(&free, "sched_process_free.p", &task, 0),
        attach_task: r.arg(&attach, "cgroup_attach_task.task", &task, 0),
        slice_level,
        task_mm: r.member(&TASK_MM),
        mm_rss_stat: rss.map_or(MISSING, |c| c.at),
        rss_counter_size: rss.map_or(MISSING, |c| c.size),
        rss_counter_count: rss.map_or(MISSING, |c| c.count),
        rss_counter_percpu: rss.and_then(|c| c.percpu).unwrap_or(MISSING),
        nr_cpus: 0,
        bpf_array_pptrs: r.member(&BPF_ARRAY_PPTRS),
        css_set_memory: memcg.map_or(MISSING, |m| m[0]),
        css_cgroup: memcg.map_or(MISSING, |m| m[1]),
        memcg_usage: memcg.map_or(MISSING, |m| m[2]),
        memcg_watermark: memcg.map_or(MISSING, |m| m[3]),
        memcg_max: memcg.map_or(MISSING, |m| m[4]),
        memcg_oom_kills: memcg.map_or(MISSING, |m| m[5]),
    };
    let mut missing = r.missing;
    if layout.rss_counter_percpu != MISSING && layout.bpf_array_pptrs == MISSING {
        layout.mm_rss_stat = MISSING;
        missing.insert(RSS_STAT.name.into(), "its per-CPU parts need bpf_array.pptrs".into());
    }
    // The programs read their arguments at these positions (see monitor-ebpf's lifecycle.rs).
    for (name, got, want) in [
        ("sched_process_fork.parent", layout.fork_parent, 0),
        ("sched_process_fork.child", layout.fork_child, 1),
        ("sched_process_exec.p", layout.exec_task, 0),
        ("sched_process_exit.p", layout.exit_task, 0),
        ("sched_process_free.p", layout.free_task, 0),
        ("cgroup_attach_task.task", layout.attach_task, 2),
    ] {
        if got != MISSING && got != want {
            missing.insert(name.into(), format!("argument at position {got}, the program reads {want}"));
        }
    }
    if layout.exit_group_dead != MISSING && layout.exit_group_dead != 1 {
        missing.insert("sched_process_exit.group_dead".into(), "not argument 1".into());
    }
    // The iterator reads its context at fixed offsets, the only kind the verifier allows.
    if (layout.iter_meta, layout.iter_task) != (0, 8) && !missing.contains_key("bpf_iter__task.task") {
        missing.insert("bpf_iter__task.task".into(), "bpf_iter__task is not { meta@0, task@8 }".into());
    }
    Resolved { layout, missing }
}

/// The members each figure reads beyond what every program needs (see `probes::figures`).
pub const SUM_EXEC_RUNTIME: Member =
    member("task_struct.se.sum_exec_runtime", "task_struct", &[&["se", "sum_exec_runtime"]]);
pub const UNCHARGED: [Member; 6] = [
    member("task_struct.on_cpu", "task_struct", &[&["on_cpu"]]),
    member("task_struct.se.exec_start", "task_struct", &[&["se", "exec_start"]]),
    member("task_struct.se.cfs_rq", "task_struct", &[&["se", "cfs_rq"]]),
    member("cfs_rq.rq", "cfs_rq", &[&["rq"]]),
    member("rq.clock", "rq", &[&["clock"]]),
    member("rq.clock_task", "rq", &[&["clock_task"]]),
];
pub const RUN_DELAY: [Member; 2] = [
    member("task_struct.sched_info.run_delay", "task_struct", &[&["sched_info", "run_delay"]]),
    member("task_struct.sched_info.pcount", "task_struct", &[&["sched_info", "pcount"]]),
];
pub const SWITCHES: [Member; 2] = [
    member("task_struct.nvcsw", "task_struct", &[&["nvcsw"]]),
    member("task_struct.nivcsw", "task_struct", &[&["nivcsw"]]),
];
pub const SYSCALL_IO: [Member; 2] = [
    member("task_struct.ioac.rchar", "task_struct", &[&["ioac", "rchar"]]),
    member("task_struct.ioac.wchar", "task_struct", &[&["ioac", "wchar"]]),
];
/// Whether a task may stall (`TASK_MAY_STALL`); without them every task may. Renamed in 5.14.
pub const TASK_STATE: [Member; 2] = [
    member("task_struct.__state", "task_struct", &[&["__state"], &["state"]]),
    member("task_struct.on_rq", "task_struct", &[&["on_rq"]]),
];
pub const READ_BYTES: Member =
    member("task_struct.ioac.read_bytes", "task_struct", &[&["ioac", "read_bytes"]]);
pub const WRITE_BYTES: Member =
    member("task_struct.ioac.write_bytes", "task_struct", &[&["ioac", "write_bytes"]]);

/// A process's resident memory (`Task::memory` in the probes); without it, or without the
/// rest of `RssCounters`, the loader reads `/proc/<pid>/statm`.
pub const TASK_MM: Member = member("task_struct.mm", "task_struct", &[&["mm"]]);
pub const RSS_STAT: Member = member("mm_struct.rss_stat", "mm_struct", &[&["rss_stat"]]);
pub const BPF_ARRAY_PPTRS: Member = member("bpf_array.pptrs", "bpf_array", &[&["pptrs"]]);

/// Where `mm_struct.rss_stat`'s counters are, and how to read one as `statm` does.
#[derive(Clone, Copy, Debug)]
struct RssCounters {
    /// `mm_struct.rss_stat`.
    at: u32,
    /// Bytes from one counter to the next.
    size: u32,
    /// The counter's folded value in it: `percpu_counter.count` from 6.2, the
    /// `atomic_long_t` itself before.
    count: u32,
    /// `percpu_counter.counters`, the per-CPU parts not yet folded into `count` (from 6.2).
    percpu: Option<u32>,
}

/// `rss_stat` is `struct percpu_counter rss_stat[NR_MM_COUNTERS]` from 6.2, and before it
/// `struct mm_rss_stat { atomic_long_t count[NR_MM_COUNTERS]; }`.
fn rss_counters(btf: &Btf, at: u32) -> Result<RssCounters> {
    let (_, rss_stat) = offset_and_type(btf, "mm_struct", &["rss_stat"])?;
    if let Some(counter) = array_of_structs(btf, rss_stat)? {
        let count = offset(btf, "percpu_counter", &["count"])?;
        let percpu = offset(btf, "percpu_counter", &["counters"])?;
        return Ok(RssCounters { at, size: counter.size() as u32, count, percpu: Some(percpu) });
    }
    let (count, counters) = offset_and_type(btf, "mm_rss_stat", &["count"])?;
    let counter = array_of_structs(btf, counters)?
        .ok_or_else(|| Error::Btf("mm_rss_stat.count is not an array of atomic_long_t".into()))?;
    Ok(RssCounters { at, size: counter.size() as u32, count, percpu: None })
}

/// The struct an array of structs holds; `None` for any other type.
fn array_of_structs(btf: &Btf, t: Type) -> Result<Option<btf_rs::Struct>> {
    let Type::Array(a) = strip(btf, t)? else { return Ok(None) };
    let element = btf.resolve_chained_type(&a).map_err(|e| btf_err("an array's element type", e))?;
    Ok(match strip(btf, element)? {
        Type::Struct(s) => Some(s),
        _ => None,
    })
}

/// A memory cgroup's counters (`Task::memory_cgroup` in the probes); without them the
/// loader reads its memory files.
pub const MEMORY_CGROUP: &str = "mem_cgroup.memory";

/// Offsets of `css_set.subsys[memory_cgrp_id]`, `cgroup_subsys_state.cgroup`,
/// `mem_cgroup.memory.{usage, watermark, max}` and `mem_cgroup.memory_events[MEMCG_OOM_KILL]`.
fn memory_cgroup(btf: &Btf) -> Result<[u32; 6]> {
    if offset(btf, "mem_cgroup", &["css"])? != 0 {
        return Err(Error::Btf("mem_cgroup.css is not its first member".into()));
    }
    let memory = enum_value(btf, "cgroup_subsys_id", "memory_cgrp_id")?;
    let oom_kill = enum_value(btf, "memcg_memory_event", "MEMCG_OOM_KILL")?;
    Ok([
        offset(btf, "css_set", &["subsys"])? + 8 * memory,
        offset(btf, "cgroup_subsys_state", &["cgroup"])?,
        offset(btf, "mem_cgroup", &["memory", "usage"])?,
        offset(btf, "mem_cgroup", &["memory", "watermark"])?,
        offset(btf, "mem_cgroup", &["memory", "max"])?,
        offset(btf, "mem_cgroup", &["memory_events"])? + 8 * oom_kill,
    ])
}

/// The value of `value` in `enum name`.
fn enum_value(btf: &Btf, name: &str, value: &str) -> Result<u32> {
    let types = btf.resolve_types_by_name(name).map_err(|e| btf_err(format!("enum {name}"), e))?;
    types
        .iter()
        .find_map(|t| match t {
            Type::Enum(e) => e.members.iter().find(|m| btf.resolve_name(*m).is_ok_and(|n| n == value)),
            _ => None,
        })
        .map(|m| m.val())
        .ok_or_else(|| Error::Btf(format!("enum {name} has no {value}")))
}

impl Member {
    pub fn name(&self) -> &'static str {
        self.name
    }
}

/// `resolve` on the running kernel's BTF, in a child process: the parse takes tens of MiB
/// for a moment, which then never count in the daemon's own memory. The child sends the
/// layout and what is missing back through a pipe, and exits.
pub fn resolve_running_kernel(slice_level: u32, withheld: &BTreeSet<String>) -> Result<Resolved> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error::io("pipe", std::io::Error::last_os_error()));
    }
    // SAFETY: the child only parses, writes to the pipe and exits with `_exit`; glibc's
    // allocator stays usable after fork.
    match unsafe { libc::fork() } {
        -1 => Err(Error::io("fork", std::io::Error::last_os_error())),
        0 => {
            // SAFETY: fds[1] is this process's write end; fds[0] is not used here.
            let mut out = unsafe { std::fs::File::from_raw_fd(fds[1]) };
            let reply = match Btf::from_file(VMLINUX_BTF) {
                Ok(btf) => encode(&with_cpus(resolve(&btf, slice_level, withheld), possible_cpus())),
                Err(e) => [b"E".as_slice(), e.to_string().as_bytes()].concat(),
            };
            let code = i32::from(std::io::Write::write_all(&mut out, &reply).is_err());
            // SAFETY: ends the child without running the parent's exit handlers.
            unsafe { libc::_exit(code) }
        }
        child => {
            // SAFETY: both descriptors are ours; the read end is owned by `input` from here.
            unsafe { libc::close(fds[1]) };
            // SAFETY: fds[0] is pipe2()'s read end, open and owned by nothing else; `input` takes it.
            let mut input = unsafe { std::fs::File::from_raw_fd(fds[0]) };
            let mut reply = Vec::new();
            let read = std::io::Read::read_to_end(&mut input, &mut reply);
            let mut status = 0;
            // SAFETY: waits for our own child.
            unsafe { libc::waitpid(child, &mut status, 0) };
            read.map_err(|e| Error::io("reading the layout from the child", e))?;
            decode(&reply)
        }
    }
}

/// `nr_cpu_ids`: one more than the last CPU in `/sys/devices/system/cpu/possible` (`0-127`).
fn possible_cpus() -> Option<u32> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible").ok()?;
    let last = text.trim().rsplit([',', '-']).next()?;
    last.parse::<u32>().ok()?.checked_add(1)
}

/// `r` with the CPUs the probes sum per-CPU counter parts over; where those are needed and
/// the CPUs are unknown or too many to sum in the kernel, process memory is left to `/proc`.
fn with_cpus(mut r: Resolved, cpus: Option<u32>) -> Resolved {
    r.layout.nr_cpus = cpus.unwrap_or(0);
    if r.layout.rss_counter_percpu != MISSING && !(1..=MAX_CPUS).contains(&r.layout.nr_cpus) {
        r.layout.mm_rss_stat = MISSING;
        r.missing.insert(
            RSS_STAT.name.into(),
            format!("{cpus:?} possible CPUs, and the probes sum per-CPU parts over at most {MAX_CPUS}"),
        );
    }
    r
}

/// `Resolved` as bytes: `L`, the layout, then `name\0reason\0` per missing name.
fn encode(r: &Resolved) -> Vec<u8> {
    // SAFETY: KernelLayout is repr(C) plain old data of u32s, without padding.
    let layout = unsafe {
        std::slice::from_raw_parts((&raw const r.layout).cast::<u8>(), std::mem::size_of::<KernelLayout>())
    };
    let mut out = [b"L".as_slice(), layout].concat();
    for (name, why) in &r.missing {
        out.extend([name.as_bytes(), b"\0", why.as_bytes(), b"\0"].concat());
    }
    out
}

fn decode(reply: &[u8]) -> Result<Resolved> {
    let size = std::mem::size_of::<KernelLayout>();
    match reply.split_first() {
        Some((b'L', rest)) if rest.len() >= size => {
            // SAFETY: the child wrote a KernelLayout's bytes; any bit pattern is valid.
            let layout = unsafe { rest.as_ptr().cast::<KernelLayout>().read_unaligned() };
            let text = String::from_utf8_lossy(&rest[size..]);
            let mut parts = text.split('\0');
            let mut missing = Missing::new();
            while let (Some(name), Some(why)) = (parts.next(), parts.next()) {
                missing.insert(name.into(), why.into());
            }
            Ok(Resolved { layout, missing })
        }
        Some((b'E', why)) => {
            Err(Error::NoBtf { path: VMLINUX_BTF.into(), reason: String::from_utf8_lossy(why).into() })
        }
        _ => Err(Error::Btf("the layout child process ended without an answer".into())),
    }
}

struct Resolver<'a> {
    btf: &'a Btf,
    withheld: &'a BTreeSet<String>,
    missing: Missing,
}

impl Resolver<'_> {
    fn member(&mut self, m: &Member) -> u32 {
        if self.withheld.contains(m.name) {
            self.missing.insert(m.name.into(), "withheld by HIVE_MONITOR_WITHHOLD".into());
            return MISSING;
        }
        let mut last = None;
        for path in m.paths {
            match offset(self.btf, m.strukt, path) {
                Ok(off) => return off,
                Err(e) => last = Some(e),
            }
        }
        let reason = match (m.paths.len(), last) {
            (1, Some(e)) => e.to_string(),
            (_, _) => format!(
                "struct {} has none of the members {}",
                m.strukt,
                m.paths.iter().map(|p| p.join(".")).collect::<Vec<_>>().join(", ")
            ),
        };
        self.missing.insert(m.name.into(), reason);
        MISSING
    }

    /// `mm_struct.rss_stat` and how its counters read; `None`, with the reason listed
    /// under `mm_struct.rss_stat`, when they cannot be read as `statm` reads them.
    fn rss_counters(&mut self) -> Option<RssCounters> {
        let at = self.member(&RSS_STAT);
        if at == MISSING {
            return None;
        }
        rss_counters(self.btf, at).map_err(|e| self.missing.insert(RSS_STAT.name.into(), e.to_string())).ok()
    }

    /// The memory cgroup offsets, or `None` with the reason listed under `MEMORY_CGROUP`.
    fn memory_cgroup(&mut self) -> Option<[u32; 6]> {
        if self.withheld.contains(MEMORY_CGROUP) {
            self.missing.insert(MEMORY_CGROUP.into(), "withheld by HIVE_MONITOR_WITHHOLD".into());
            return None;
        }
        memory_cgroup(self.btf).map_err(|e| self.missing.insert(MEMORY_CGROUP.into(), e.to_string())).ok()
    }

    fn tracepoint(&mut self, name: &'static str) -> Option<TracepointArgs> {
        if self.withheld.contains(name) {
            self.missing.insert(name.into(), "withheld by HIVE_MONITOR_WITHHOLD".into());
            return None;
        }
        TracepointArgs::resolve(self.btf, name)
            .map_err(|e| self.missing.insert(name.into(), e.to_string()))
            .ok()
    }

    fn arg(&mut self, tp: &Option<TracepointArgs>, name: &str, kind: &ArgKind, n: usize) -> u32 {
        let Some(tp) = tp else { return MISSING };
        tp.nth(kind, n).unwrap_or_else(|| {
            self.missing.insert(
                name.into(),
                format!("tracepoint {} has no argument #{n} of kind {kind:?} (has {:?})", tp.name, tp.kinds),
            );
            MISSING
        })
    }
}

fn btf_err(what: impl std::fmt::Display, e: btf_rs::Error) -> Error {
    Error::Btf(format!("{what}: {e}"))
}

/// Follows typedefs and qualifiers to the type they name.
fn strip(btf: &Btf, mut t: Type) -> Result<Type> {
    loop {
        t = match &t {
            Type::Typedef(x) => btf.resolve_chained_type(x),
            Type::Const(x) | Type::Volatile(x) | Type::Restrict(x) => btf.resolve_chained_type(x),
            Type::TypeTag(x) => btf.resolve_chained_type(x),
            _ => return Ok(t),
        }
        .map_err(|e| btf_err("following a typedef", e))?;
    }
}

fn named_struct(btf: &Btf, name: &str) -> Result<btf_rs::Struct> {
    let types = btf.resolve_types_by_name(name).map_err(|e| btf_err(format!("struct {name}"), e))?;
    types
        .into_iter()
        .find_map(|t| match t {
            Type::Struct(s) if !s.members.is_empty() => Some(s),
            _ => None,
        })
        .ok_or_else(|| Error::Btf(format!("struct {name} not found")))
}

/// Byte offset of `path` (nested member names) inside `struct name`; members of anonymous
/// structs and unions are searched through, as C does.
pub fn offset(btf: &Btf, name: &str, path: &[&str]) -> Result<u32> {
    offset_and_type(btf, name, path).map(|(off, _)| off)
}

/// `offset`, and the member's type.
fn offset_and_type(btf: &Btf, name: &str, path: &[&str]) -> Result<(u32, Type)> {
    let s = named_struct(btf, name)?;
    let (bits, t) = member_bits(btf, &s, path)
        .ok_or_else(|| Error::Btf(format!("struct {name} has no member {}", path.join("."))))?;
    if bits % 8 != 0 {
        return Err(Error::Btf(format!("{name}.{} is a bit field", path.join("."))));
    }
    Ok((bits / 8, t))
}

fn member_bits(btf: &Btf, s: &btf_rs::Struct, path: &[&str]) -> Option<(u32, Type)> {
    let (first, rest) = path.split_first()?;
    for m in &s.members {
        let name = btf.resolve_name(m).unwrap_or_default();
        let inner = || match strip(btf, btf.resolve_chained_type(m).ok()?).ok()? {
            Type::Struct(x) | Type::Union(x) => Some(x),
            _ => None,
        };
        let below =
            |path| inner().and_then(|x| member_bits(btf, &x, path)).map(|(o, t)| (m.bit_offset() + o, t));
        if name.is_empty() {
            if let Some(found) = below(path) {
                return Some(found);
            }
        } else if name == *first {
            if rest.is_empty() {
                return Some((m.bit_offset(), btf.resolve_chained_type(m).ok()?));
            }
            return below(rest);
        }
    }
    None
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum ArgKind {
    Bool,
    /// A pointer to the struct of this name.
    StructPtr(String),
    /// An integer of this many bytes.
    Int(usize),
    Other,
}

fn task_ptr() -> ArgKind {
    ArgKind::StructPtr("task_struct".into())
}

/// The argument kinds of a tracepoint's `TP_PROTO`, read from the kernel's
/// `btf_trace_<name>` typedef (its parameter names are not in BTF, so kinds identify them).
struct TracepointArgs {
    name: &'static str,
    kinds: Vec<ArgKind>,
}

impl TracepointArgs {
    fn resolve(btf: &Btf, name: &'static str) -> Result<Self> {
        let typedef = format!("btf_trace_{name}");
        let err = |e| btf_err(&typedef, e);
        let t = btf.resolve_types_by_name(&typedef).map_err(err)?.into_iter().next();
        let Some(Type::Typedef(t)) = t else {
            return Err(Error::Btf(format!("tracepoint {name}: no {typedef} in kernel BTF")));
        };
        let Type::Ptr(p) = btf.resolve_chained_type(&t).map_err(err)? else {
            return Err(Error::Btf(format!("{typedef} is not a function pointer")));
        };
        let Type::FuncProto(proto) = btf.resolve_chained_type(&p).map_err(err)? else {
            return Err(Error::Btf(format!("{typedef} is not a function pointer")));
        };
        // The first parameter is the tracepoint's private `void *__data`, not a TP_PROTO arg.
        let kinds = proto
            .parameters
            .iter()
            .skip(1)
            .map(|param| {
                let t = btf.resolve_chained_type(param).map_err(err)?;
                Ok(match strip(btf, t)? {
                    Type::Int(i) if i.is_bool() => ArgKind::Bool,
                    Type::Int(i) => ArgKind::Int(i.size()),
                    Type::Ptr(p) => match strip(btf, btf.resolve_chained_type(&p).map_err(err)?)? {
                        Type::Struct(s) => ArgKind::StructPtr(btf.resolve_name(&s).unwrap_or_default()),
                        _ => ArgKind::Other,
                    },
                    _ => ArgKind::Other,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { name, kinds })
    }

    /// Position of the `n`th argument of `kind`.
    fn nth(&self, kind: &ArgKind, n: usize) -> Option<u32> {
        self.kinds.iter().enumerate().filter(|(_, k)| *k == kind).nth(n).map(|(i, _)| i as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where `cargo xtask test-kernels` leaves the BTF of each kernel of the matrix.
    const BTF_DIR_ENV: &str = "HIVE_MONITOR_BTF_DIR";

    fn resolve_file(path: &std::path::Path) -> Resolved {
        let btf = Btf::from_file(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        resolve(&btf, 1, &BTreeSet::new())
    }

    #[test]
    fn this_kernel_has_everything() {
        let path = std::path::Path::new(VMLINUX_BTF);
        if !path.exists() {
            eprintln!("SKIPPED this_kernel_has_everything: no {VMLINUX_BTF}");
            return;
        }
        let r = resolve_file(path);
        assert!(r.missing.is_empty(), "missing on this kernel: {:?}", r.missing);
        assert_eq!((r.layout.iter_meta, r.layout.iter_task), (0, 8));
    }

    /// Every kernel of the matrix (5.10 → 7.x) resolves every member and tracepoint, each
    /// under whichever of its names that kernel uses.
    #[test]
    fn every_kernel_of_the_matrix_resolves() {
        let Some(dir) = std::env::var_os(BTF_DIR_ENV) else {
            eprintln!("SKIPPED every_kernel_of_the_matrix_resolves: {BTF_DIR_ENV} not set (cargo xtask test-kernels sets it)");
            return;
        };
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", std::path::Path::new(&dir).display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "btf"))
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no .btf files in {dir:?}");
        for path in files {
            let r = resolve_file(&path);
            eprintln!(
                "{}: task.se.sum_exec_runtime@{} sched_info.run_delay@{} nvcsw@{} ioac.rchar@{} kernfs parent@{} group_dead arg {} mm.rss_stat@{} ({} bytes a counter, count@{} per-CPU parts@{})",
                path.display(),
                r.layout.task_sum_exec_runtime,
                r.layout.task_run_delay,
                r.layout.task_nvcsw,
                r.layout.task_rchar,
                r.layout.kernfs_node_parent,
                r.layout.exit_group_dead,
                r.layout.mm_rss_stat,
                r.layout.rss_counter_size,
                r.layout.rss_counter_count,
                r.layout.rss_counter_percpu,
            );
            assert!(r.missing.is_empty(), "{}: missing {:?}", path.display(), r.missing);
        }
    }

    #[test]
    fn the_possible_cpus_parse() {
        let cpus = possible_cpus().expect("/sys/devices/system/cpu/possible");
        assert!(cpus >= 1 && cpus as usize >= std::thread::available_parallelism().unwrap().get());
    }

    #[test]
    fn the_child_process_answers_what_a_parse_here_gives() {
        let path = std::path::Path::new(VMLINUX_BTF);
        if !path.exists() {
            eprintln!("SKIPPED the_child_process_answers_what_a_parse_here_gives: no {VMLINUX_BTF}");
            return;
        }
        let withheld = BTreeSet::from(["task_struct.nvcsw".to_string()]);
        let child = resolve_running_kernel(3, &withheld).unwrap();
        let here = with_cpus(resolve(&Btf::from_file(path).unwrap(), 3, &withheld), possible_cpus());
        assert_eq!(child.layout, here.layout);
        assert_eq!(child.missing, here.missing);
    }

    #[test]
    fn a_withheld_name_is_missing_with_the_reason() {
        let path = std::path::Path::new(VMLINUX_BTF);
        if !path.exists() {
            eprintln!("SKIPPED a_withheld_name_is_missing_with_the_reason: no {VMLINUX_BTF}");
            return;
        }
        let btf = Btf::from_file(path).unwrap();
        let withheld = BTreeSet::from(["task_struct.nvcsw".to_string(), "sched_process_free".to_string()]);
        let r = resolve(&btf, 1, &withheld);
        assert_eq!(r.layout.task_nvcsw, MISSING);
        assert_eq!(r.layout.free_task, MISSING);
        assert_ne!(r.layout.task_nivcsw, MISSING);
        assert_eq!(r.missing.keys().collect::<Vec<_>>(), ["sched_process_free", "task_struct.nvcsw"]);
    }
}
