//! Worker memory equals its memory cgroup's own files at sample time, and is summed over its
//! processes (and labelled so) when that cgroup is shared with processes outside the worker.
use std::{path::Path, time::Duration};

use hive_monitor_tests::*;
use monitor_user::{
    sample::WorkerSample,
    sampler::{BpfMode, Sampler, SamplerOptions},
    sources::{cgroup::Slice, memory::Origin},
};

const HM_LOAD: &str = env!("CARGO_BIN_EXE_hm-load");

fn read_u64(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .parse()
        .unwrap()
}

fn sample_worker(sampler: &mut Sampler) -> WorkerSample {
    let sample = sampler.sample().expect("sample");
    assert_eq!(sample.workers.len(), 1, "{sample:#?}");
    sample.workers[0].clone()
}

/// One sample of the test's slice, by probes with `withheld` treated as missing.
fn sample_withholding(cg: &TestCgroup, withheld: Option<&str>) -> WorkerSample {
    let options = SamplerOptions {
        bpf: BpfMode::Required,
        withhold: withheld.into_iter().map(String::from).collect(),
        ..Default::default()
    };
    let slice = Slice::new(&cg.root, &cg.rel("rbee.slice")).unwrap();
    sample_worker(&mut Sampler::with_options(slice, options).unwrap())
}

#[test]
fn memory_comes_from_the_workers_own_memory_cgroup() {
    if !bpf_available("memory_cgroup") {
        return;
    }
    let Some(cg) = TestCgroup::with_v1("mem_own", &["memory"]) else {
        eprintln!("SKIPPED memory_comes_from_the_workers_own_memory_cgroup: no hybrid layout here");
        return;
    };
    let v2 = cg.mkdir("rbee.slice/llm/8080");
    let v1 = Path::new("/sys/fs/cgroup/memory").join(&cg.rel).join("rbee.slice/llm/8080");
    std::fs::create_dir_all(&v1).unwrap();
    std::fs::write(v1.join("memory.limit_in_bytes"), (512u64 << 20).to_string()).unwrap();
    let _load = Workload::start_in(HM_LOAD, &[&v2, &v1], &["alloc", "64", "60"]);
    std::thread::sleep(Duration::from_millis(500));

    // The task iterator reads the cgroup's counters, and only memory.stat is read; withheld,
    // every file is. Both equal the files.
    for withheld in [None, Some("mem_cgroup.memory")] {
        let m = sample_withholding(&cg, withheld).memory.expect("memory read");
        assert_eq!(m.origin, Origin::CgroupV1, "withheld: {withheld:?}");
        assert_eq!(m.current, read_u64(&v1.join("memory.usage_in_bytes")), "withheld: {withheld:?}");
        assert_eq!(m.peak, Some(read_u64(&v1.join("memory.max_usage_in_bytes"))), "withheld: {withheld:?}");
        assert_eq!(m.limit, Some(512 << 20), "withheld: {withheld:?}");
        assert_eq!(m.oom_kills, Some(0), "withheld: {withheld:?}");
        assert!(m.anon.unwrap() >= 64 << 20, "the 64 MiB the load touched: {m:?}");
    }
    let _ = std::fs::remove_dir(&v1); // best effort; TestCgroup removes it after the load dies
}

/// Where the memory cgroup is shared with processes outside the worker, the figure is the
/// worker's processes' own counters: summed by the task iterator in the kernel and, with it
/// withheld, from `/proc/<pid>/statm`. Both equal what `/proc/<pid>/status` reports, kind by
/// kind (on kernels from 6.16 that includes each counter's per-CPU parts).
#[test]
fn a_shared_memory_cgroup_is_summed_over_the_processes() {
    if !bpf_available("memory_processes") {
        return;
    }
    let cg = TestCgroup::new("mem_shared");
    let v2 = cg.mkdir("rbee.slice/llm/8080");
    // Only moved in v2: in v1 the load shares this test's memory cgroup.
    let load = Workload::start(HM_LOAD, &v2, &["alloc", "32", "60"]);
    std::thread::sleep(Duration::from_millis(500));

    for (withheld, origin) in [(None, Origin::Ebpf), (Some("mm_struct.rss_stat"), Origin::Procfs)] {
        let m = sample_withholding(&cg, withheld).memory.expect("memory read");
        if m.origin == Origin::CgroupV2 {
            eprintln!("SKIPPED a_shared_memory_cgroup_is_summed_over_the_processes: the v2 worker cgroup has its own memory controller");
            return;
        }
        let status = |field: &str| proc_field(load.pid(), "status", field) * 1024;
        assert_eq!(m.origin, origin, "withheld: {withheld:?}");
        assert_eq!(m.current, status("VmRSS:"), "{origin:?}");
        assert_eq!(m.anon, Some(status("RssAnon:")), "{origin:?}");
        assert_eq!(m.file, Some(status("RssFile:") + status("RssShmem:")), "{origin:?}");
        assert!(m.current >= 32 << 20 && m.peak.is_none() && m.limit.is_none(), "{m:?}");
    }
}
