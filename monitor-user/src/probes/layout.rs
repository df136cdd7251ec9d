//! Resolves `KernelLayout` from the running kernel's BTF: the struct field offsets and
//! tracepoint argument positions the probes use, so nothing kernel-specific is compiled in.
use btf_rs::{Btf, Type};
use monitor_common::KernelLayout;

use crate::error::{Error, Result};

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Where `pt_regs` keeps the system call number.
#[cfg(target_arch = "x86_64")]
const SYSCALL_NR_FIELD: &str = "orig_ax";
#[cfg(target_arch = "aarch64")]
const SYSCALL_NR_FIELD: &str = "syscallno";

pub fn resolve(btf: &Btf, slice_level: u32) -> Result<KernelLayout> {
    let switch = TracepointArgs::resolve(btf, "sched_switch")?;
    let runtime = TracepointArgs::resolve(btf, "sched_stat_runtime")?;
    let sys_exit = TracepointArgs::resolve(btf, "sys_exit")?;
    let bio_queue = TracepointArgs::resolve(btf, "block_bio_queue")?;
    let dirty = TracepointArgs::resolve(btf, "writeback_dirty_folio")?;
    let fork = TracepointArgs::resolve(btf, "sched_process_fork")?;
    let exec = TracepointArgs::resolve(btf, "sched_process_exec")?;
    let exit = TracepointArgs::resolve(btf, "sched_process_exit")?;
    let task_cpu = offset(btf, "task_struct", &["thread_info", "cpu"])
        .or_else(|_| offset(btf, "task_struct", &["cpu"]))?;
    Ok(KernelLayout {
        task_pid: offset(btf, "task_struct", &["pid"])?,
        task_cgroups: offset(btf, "task_struct", &["cgroups"])?,
        task_cpu,
        css_set_dfl_cgrp: offset(btf, "css_set", &["dfl_cgrp"])?,
        cgroup_level: offset(btf, "cgroup", &["level"])?,
        cgroup_kn: offset(btf, "cgroup", &["kn"])?,
        kernfs_node_id: offset(btf, "kernfs_node", &["id"])?,
        kernfs_node_parent: offset(btf, "kernfs_node", &["__parent"])
            .or_else(|_| offset(btf, "kernfs_node", &["parent"]))?,
        switch_preempt: switch.nth(ArgKind::Bool, 0)?,
        switch_prev: switch.nth(task_ptr(), 0)?,
        switch_next: switch.nth(task_ptr(), 1)?,
        switch_prev_state: switch.nth(ArgKind::Int(4), 0)?,
        runtime_task: runtime.nth(task_ptr(), 0)?,
        runtime_delta: runtime.nth(ArgKind::Int(8), 0)?,
        task_run_delay: offset(btf, "task_struct", &["sched_info", "run_delay"])?,
        task_pcount: offset(btf, "task_struct", &["sched_info", "pcount"])?,
        task_last_queued: offset(btf, "task_struct", &["sched_info", "last_queued"])?,
        task_cfs_rq: offset(btf, "task_struct", &["se", "cfs_rq"])?,
        cfs_rq_rq: offset(btf, "cfs_rq", &["rq"])?,
        rq_clock: offset(btf, "rq", &["clock"])?,
        task_tgid: offset(btf, "task_struct", &["tgid"])?,
        fork_parent: fork.nth(task_ptr(), 0)?,
        fork_child: fork.nth(task_ptr(), 1)?,
        exec_task: exec.nth(task_ptr(), 0)?,
        exit_task: exit.nth(task_ptr(), 0)?,
        exit_group_dead: exit.nth(ArgKind::Bool, 0).unwrap_or(u32::MAX),
        sys_exit_regs: sys_exit.nth(ArgKind::StructPtr("pt_regs".into()), 0)?,
        sys_exit_ret: sys_exit.nth(ArgKind::Int(8), 0)?,
        pt_regs_syscall_nr: offset(btf, "pt_regs", &[SYSCALL_NR_FIELD])?,
        bio_queue_bio: bio_queue.nth(ArgKind::StructPtr("bio".into()), 0)?,
        bio_opf: offset(btf, "bio", &["bi_opf"])?,
        bio_size: offset(btf, "bio", &["bi_iter", "bi_size"])?,
        bio_vcnt: offset(btf, "bio", &["bi_vcnt"])?,
        bio_io_vec: offset(btf, "bio", &["bi_io_vec"])?,
        bio_vec_page: offset(btf, "bio_vec", &["bv_page"])?,
        task_bio_list: offset(btf, "task_struct", &["bio_list"])?,
        page_flags: offset(btf, "page", &["flags"])?,
        page_compound_head: offset(btf, "page", &["compound_head"])?,
        pg_writeback: enum_value(btf, "pageflags", "PG_writeback")?,
        pg_head: enum_value(btf, "pageflags", "PG_head")?,
        folio_nr_pages: offset(btf, "folio", &["_nr_pages"])?,
        dirty_folio: dirty.nth(ArgKind::StructPtr("folio".into()), 0)?,
        dirty_mapping: dirty.nth(ArgKind::StructPtr("address_space".into()), 0)?,
        mapping_host: offset(btf, "address_space", &["host"])?,
        inode_sb: offset(btf, "inode", &["i_sb"])?,
        sb_bdi: offset(btf, "super_block", &["s_bdi"])?,
        sb_magic: offset(btf, "super_block", &["s_magic"])?,
        bdi_capabilities: offset(btf, "backing_dev_info", &["capabilities"])?,
        // SAFETY: sysconf has no preconditions.
        page_size: u32::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .map_err(|_| Error::Btf("no page size from sysconf".into()))?,
        slice_level,
    })
}

/// The value of enumerator `member` of `enum name`.
fn enum_value(btf: &Btf, name: &str, member: &str) -> Result<u32> {
    let types = btf.resolve_types_by_name(name).map_err(|e| btf_err(format!("enum {name}"), e))?;
    types
        .iter()
        .find_map(|t| match t {
            Type::Enum(e) => e.members.iter().find(|m| btf.resolve_name(*m).is_ok_and(|n| n == member)),
            _ => None,
        })
        .map(|m| m.val())
        .ok_or_else(|| Error::Btf(format!("enum {name} has no {member}")))
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
    let s = named_struct(btf, name)?;
    let bits = member_bits(btf, &s, path)
        .ok_or_else(|| Error::Btf(format!("struct {name} has no member {}", path.join("."))))?;
    if bits % 8 != 0 {
        return Err(Error::Btf(format!("{name}.{} is a bit field", path.join("."))));
    }
    Ok(bits / 8)
}

fn member_bits(btf: &Btf, s: &btf_rs::Struct, path: &[&str]) -> Option<u32> {
    let (first, rest) = path.split_first()?;
    for m in &s.members {
        let name = btf.resolve_name(m).unwrap_or_default();
        let inner = || match strip(btf, btf.resolve_chained_type(m).ok()?).ok()? {
            Type::Struct(x) | Type::Union(x) => Some(x),
            _ => None,
        };
        if name.is_empty() {
            if let Some(off) = inner().and_then(|x| member_bits(btf, &x, path)) {
                return Some(m.bit_offset() + off);
            }
        } else if name == *first {
            if rest.is_empty() {
                return Some(m.bit_offset());
            }
            return inner().and_then(|x| member_bits(btf, &x, rest)).map(|o| m.bit_offset() + o);
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
    fn nth(&self, kind: ArgKind, n: usize) -> Result<u32> {
        self.kinds.iter().enumerate().filter(|(_, k)| **k == kind).nth(n).map(|(i, _)| i as u32).ok_or_else(
            || {
                Error::Btf(format!(
                    "tracepoint {} has no argument #{n} of kind {kind:?} (has {:?})",
                    self.name, self.kinds
                ))
            },
        )
    }
}
