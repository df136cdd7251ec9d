//! Map pressure: more workers than the kernel's map of process counts holds. The overflow
//! is counted and reported, the counts it makes unknown are null, and every other figure
//! stays exact against `cpu.stat` (task counters are kept by the loader, not in a map).
use std::time::Duration;

use hive_monitor_tests::*;
use monitor_user::{
    heartbeat::{self, HiveIdentity},
    probes::MapSizes,
    sampler::{Sampler, SamplerOptions},
    sources::cgroup::Slice,
};

const HM_LOAD: &str = env!("CARGO_BIN_EXE_hm-load");

fn sampler(cg: &TestCgroup, sizes: MapSizes) -> Sampler {
    cg.mkdir("rbee.slice");
    let options = SamplerOptions { map_sizes: sizes, ..Default::default() };
    Sampler::with_options(Slice::new(&cg.root, &cg.rel("rbee.slice")).unwrap(), options).unwrap()
}

fn identity() -> HiveIdentity {
    HiveIdentity { id: "test".into(), hostname: "test".into(), port: 7835 }
}

#[test]
fn more_workers_than_the_map_holds() {
    if !bpf_available("workers_map_full") {
        return;
    }
    let cg = TestCgroup::new("workers_full");
    let mut sampler = sampler(&cg, MapSizes { workers: 3 });
    let dirs: Vec<_> = (0..5).map(|i| cg.mkdir(&format!("rbee.slice/llm/w{i}"))).collect();
    let tmp = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let done: Vec<_> = (0..5).map(|i| tmp.join(format!("hm-limits-{}-{i}", std::process::id()))).collect();
    let _loads: Vec<_> = dirs
        .iter()
        .zip(&done)
        .map(|(d, f)| Workload::start(HM_LOAD, d, &["forks", "20", f.to_str().unwrap(), "60"]))
        .collect();
    sampler.sample().unwrap();
    wait_for(|| done.iter().all(|f| f.exists()), Duration::from_secs(20), "the forks");
    let slice = cg.dir.join("rbee.slice");
    freeze(&slice);
    let sample = sampler.sample().unwrap();
    let kernel: Vec<u64> = dirs.iter().map(|d| cpu_stat_ns(d)).collect();
    thaw(&slice);
    done.iter().for_each(|f| drop(std::fs::remove_file(f)));

    assert!(sample.probe_stats.workers_full > 0, "overflow counted");
    let hb = heartbeat::format(&sample, &identity(), 1);
    assert_eq!(hb.collector.probes.workers_map_full, sample.probe_stats.workers_full, "and reported");
    let (mut counted, mut unknown) = (0, 0);
    for (i, dir) in dirs.iter().enumerate() {
        let w = sample.workers.iter().find(|w| w.cgroup.dir == *dir).unwrap();
        let json = hb.workers.iter().find(|j| j.instance == w.cgroup.instance).unwrap();
        // Created after the probes were attached, so every nanosecond counts.
        let (ours, theirs) = (w.totals.cpu_ns.unwrap(), kernel[i]);
        eprintln!("w{i}: monitor {ours} ns, cpu.stat {theirs} ns, forked {:?}", json.processes_forked_total);
        // The process's start straddles its move into the worker (see churn.rs).
        assert!(ours.abs_diff(theirs) <= theirs / 200 + 1_500_000, "w{i}: {ours} vs cpu.stat {theirs}");
        // Only process counts go through the map; every other probed figure comes from the
        // task iterator, which the map's size does not limit.
        for (name, known) in [
            ("cpu_pct", json.cpu_pct.is_some()),
            ("runq_wait_pct", json.runq_wait_pct.is_some()),
            ("runq_wait_ns_total", json.runq_wait_ns_total.is_some()),
            ("ctx_switches_voluntary_total", json.ctx_switches_voluntary_total.is_some()),
            ("ctx_switches_involuntary_total", json.ctx_switches_involuntary_total.is_some()),
            ("io_syscall_write_bytes_total", json.io_syscall_write_bytes_total.is_some()),
            ("io_write_bytes_total", json.io_write_bytes_total.is_some()),
            ("io_syscall_w_mb_s", json.io_syscall_w_mb_s.is_some()),
        ] {
            assert!(known, "w{i}: {name} missing although the iterator measures it: {json:?}");
        }
        match json.processes_forked_total {
            Some(n) => {
                counted += 1;
                assert_eq!(n, 20, "w{i} forked 20");
            }
            None => {
                unknown += 1;
                assert!(json.execs_total.is_none() && json.processes_exited_total.is_none(), "{json:?}");
            }
        }
    }
    assert_eq!((counted, unknown), (3, 2), "three fit the map");
}
