//! Worker memory equals its memory cgroup's own files at sample time, and is summed from
//! `/proc` (and labelled so) when that cgroup is shared with processes outside the worker.
use std::{path::Path, time::Duration};

use hive_monitor_tests::*;
use monitor_user::{
    sample::WorkerSample,
    sampler::Sampler,
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

    let mut sampler = Sampler::new(Slice::new(&cg.root, &cg.rel("rbee.slice")).unwrap()).unwrap();
    let m = sample_worker(&mut sampler).memory.expect("memory read");
    assert_eq!(m.origin, Origin::CgroupV1);
    assert_eq!(m.current, read_u64(&v1.join("memory.usage_in_bytes")));
    assert_eq!(m.peak, Some(read_u64(&v1.join("memory.max_usage_in_bytes"))));
    assert_eq!(m.limit, Some(512 << 20));
    assert_eq!(m.oom_kills, Some(0));
    assert!(m.anon.unwrap() >= 64 << 20, "the 64 MiB the load touched: {m:?}");
    let _ = std::fs::remove_dir(&v1); // best effort; TestCgroup removes it after the load dies
}

#[test]
fn a_shared_memory_cgroup_falls_back_to_proc() {
    if !bpf_available("memory_procfs") {
        return;
    }
    let cg = TestCgroup::new("mem_shared");
    let v2 = cg.mkdir("rbee.slice/llm/8080");
    // Only moved in v2: in v1 the load shares this test's memory cgroup.
    let load = Workload::start(HM_LOAD, &v2, &["alloc", "32", "60"]);
    std::thread::sleep(Duration::from_millis(500));

    let mut sampler = Sampler::new(Slice::new(&cg.root, &cg.rel("rbee.slice")).unwrap()).unwrap();
    let w = sample_worker(&mut sampler);
    let m = w.memory.expect("memory read");
    if m.origin == Origin::CgroupV2 {
        eprintln!("SKIPPED a_shared_memory_cgroup_falls_back_to_proc: the v2 worker cgroup has its own memory controller");
        return;
    }
    assert_eq!(m.origin, Origin::Procfs);
    let vm_rss = proc_field(load.pid(), "status", "VmRSS:");
    assert_eq!(m.current, vm_rss * 1024);
    assert!(m.current >= 32 << 20 && m.peak.is_none() && m.limit.is_none(), "{m:?}");
}
