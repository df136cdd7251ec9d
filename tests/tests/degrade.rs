//! Per-figure degradation on one kernel: the loader withholds one program, kernel member,
//! tracepoint or helper (`SamplerOptions::withhold`, the daemon's `HIVE_MONITOR_WITHHOLD`),
//! as a kernel without it would. Only the figures that need it are lost, named in
//! `collector.missing` with the reason; every other figure still equals the kernel's own.
use std::{collections::BTreeSet, time::Duration};

use hive_monitor_tests::*;
use monitor_user::{
    heartbeat::{self, HiveIdentity, Source},
    sampler::{Sampler, SamplerOptions},
    sources::cgroup::Slice,
};

const HM_LOAD: &str = env!("CARGO_BIN_EXE_hm-load");
const FORKS: u64 = 10;

struct Case {
    withhold: &'static str,
    /// Figures left out, as `collector.missing` names them.
    missing: &'static [&'static str],
    /// Where CPU time then comes from.
    cpu: Source,
}

fn check(case: &Case) {
    let name = format!("withhold {}", case.withhold);
    if !bpf_available(&name) {
        return;
    }
    let cg = TestCgroup::new(&format!("degrade-{}", case.withhold.replace([':', '.'], "-")));
    let dir = cg.mkdir("rbee.slice/llm/8080");
    let options =
        SamplerOptions { withhold: BTreeSet::from([case.withhold.to_string()]), ..Default::default() };
    let mut sampler = Sampler::with_options(Slice::new(&cg.root, &cg.rel("rbee.slice")).unwrap(), options)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let done = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "hm-degrade-{}-{}",
        std::process::id(),
        case.withhold.replace(':', "-")
    ));
    let _ = std::fs::remove_file(&done);
    let busy = Workload::start(HM_LOAD, &dir, &["duty", "50", "20", "60"]);
    std::thread::sleep(Duration::from_millis(200));

    freeze(&dir);
    let first = sampler.sample().unwrap();
    let (cpu0, sched0) = (cpu_stat_ns(&dir), sched_figures(busy.pid()));
    thaw(&dir);
    let forker = Workload::start(HM_LOAD, &dir, &["forks", &FORKS.to_string(), done.to_str().unwrap(), "60"]);
    wait_for(|| done.exists(), Duration::from_secs(20), "the forks");
    std::thread::sleep(Duration::from_millis(500));
    freeze(&dir);
    let last = sampler.sample().unwrap();
    let (cpu1, sched1) = (cpu_stat_ns(&dir), sched_figures(busy.pid()));
    let forker_io = (proc_field(forker.pid(), "io", "rchar:"), proc_field(forker.pid(), "io", "wchar:"));
    thaw(&dir);
    let _ = std::fs::remove_file(&done);

    let hb = heartbeat::format(&last, &HiveIdentity { id: "t".into(), hostname: "t".into(), port: 1 }, 1);
    eprintln!("{name}: collector {:?}", hb.collector);
    let missing: BTreeSet<&str> = hb.collector.missing.keys().map(String::as_str).collect();
    assert_eq!(missing, case.missing.iter().copied().collect(), "{name}: figures left out");
    for why in hb.collector.missing.values() {
        assert!(why.starts_with("unavailable: ") && why.contains("withheld"), "{name}: reason {why:?}");
    }
    assert_eq!(hb.collector.cpu, case.cpu, "{name}: CPU source");
    let w = &hb.workers[0];
    let (a, b) = (&first.workers[0].totals, &last.workers[0].totals);

    // CPU: from the probes or the cgroup, equal to cpu.stat over the interval.
    let interval = last.at_ns - first.at_ns;
    let (ours, theirs) = (b.cpu_ns.unwrap() - a.cpu_ns.unwrap(), cpu1 - cpu0);
    let pp = ours.abs_diff(theirs) as f64 * 100.0 / interval as f64;
    eprintln!("{name}: cpu {ours} ns vs cpu.stat {theirs} ns ({pp:.4} pp)");
    assert!(pp <= 0.5, "{name}: CPU {ours} vs cpu.stat {theirs}: {pp} pp");

    let null = |figure: &str| missing.contains(figure);
    assert_eq!(w.ctx_switches_voluntary_total.is_none(), null("ctx_switches"), "{name}: {w:?}");
    assert_eq!(w.runq_wait_ns_total.is_none(), null("runq"), "{name}: {w:?}");
    assert_eq!(w.processes_forked_total.is_none(), null("processes_forked"), "{name}: {w:?}");
    if !null("ctx_switches") {
        // The busy load's own switches are part of the worker's, which the forker adds to.
        let (ours, theirs) =
            (b.voluntary_switches.unwrap() - a.voluntary_switches.unwrap(), sched1.1 - sched0.1);
        assert!(ours >= theirs, "{name}: voluntary switches {ours} < the busy load's {theirs}");
    }
    if !null("processes_forked") {
        assert_eq!(
            b.processes_forked.unwrap() - a.processes_forked.unwrap(),
            FORKS,
            "{name}: the forker's children"
        );
    }
    // I/O: the forker's writes, by the probes or its /proc/<pid>/io.
    let wchar = w.io_syscall_write_bytes_total.expect("syscall I/O has a source");
    assert!(wchar >= forker_io.1, "{name}: wchar {wchar} below the forker's {}", forker_io.1);
}

#[test]
fn a_missing_exit_program_costs_task_figures_only() {
    check(&Case { withhold: "sched_process_free", missing: &["ctx_switches", "runq"], cpu: Source::Cgroup });
}

#[test]
fn a_missing_member_costs_its_figure_only() {
    check(&Case { withhold: "task_struct.nvcsw", missing: &["ctx_switches"], cpu: Source::Ebpf });
}

#[test]
fn a_missing_tracepoint_costs_its_count_only() {
    check(&Case { withhold: "sched_process_fork", missing: &["processes_forked"], cpu: Source::Ebpf });
}

#[test]
fn a_missing_helper_costs_the_iterator_figures() {
    check(&Case {
        withhold: "helper:bpf_seq_write",
        missing: &["ctx_switches", "runq"],
        cpu: Source::Cgroup,
    });
}
