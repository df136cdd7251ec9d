//! Process lifecycle in the kernel: fork, exec and exit of a worker's processes, their CPU
//! time kept after they exit, and no per-task state left behind.
use std::{collections::HashSet, path::Path, time::Duration};

use hive_monitor_tests::*;
use monitor_common::{TaskEventKind, EXIT_PROCESS};
use monitor_user::{sampler::Sampler, sources::cgroup::Slice};

const HM_LOAD: &str = env!("CARGO_BIN_EXE_hm-load");
const FORKS: u64 = 2000;

#[test]
fn two_thousand_short_lived_processes() {
    if !bpf_available("lifecycle") {
        return;
    }
    let cg = TestCgroup::new("lifecycle");
    cg.mkdir("rbee.slice");
    let mut sampler = Sampler::new(Slice::new(&cg.root, &cg.rel("rbee.slice")).unwrap()).unwrap();
    let dir = cg.mkdir("rbee.slice/llm/forks");
    let marker = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("hm-forks-{}", std::process::id()));
    let load = Workload::start(HM_LOAD, &dir, &["forks", &FORKS.to_string(), marker.to_str().unwrap(), "60"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut events = Vec::new();
    while !marker.exists() {
        assert!(std::time::Instant::now() < deadline, "the forks did not finish");
        // Drained while the load runs, as the daemon does each interval.
        events.extend(sampler.sample().unwrap().events);
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = std::fs::remove_file(&marker);
    freeze(&dir);
    let mut sample = sampler.sample().unwrap();
    // The last children's final counters come an RCU grace period after they are reaped.
    let finals_by = std::time::Instant::now() + Duration::from_secs(5);
    while sampler.probes().unwrap().finals_awaited() > 0 && std::time::Instant::now() < finals_by {
        events.extend(sample.events.iter().copied());
        sample = sampler.sample().unwrap();
    }
    events.extend(sample.events.iter().copied());
    let kernel_ns = cpu_stat_ns(&dir);
    thaw(&dir);

    let w = sample.workers.iter().find(|w| &*w.cgroup.instance == "forks").unwrap();
    let c = w.totals.map(|v| v.expect("the probes count processes"));
    let error = (c.cpu_ns as f64 - kernel_ns as f64) / kernel_ns as f64 * 100.0;
    eprintln!(
        "lifecycle: {} forked, {} exited, {} execs; cpu {} ns vs cpu.stat {kernel_ns} ns ({error:+.3} %); \
         {} events, {} lost",
        c.processes_forked,
        c.processes_exited,
        c.execs,
        c.cpu_ns,
        events.len(),
        sample.probe_stats.events_lost
    );
    assert!(error.abs() <= 0.5, "cpu {} ns vs cpu.stat {kernel_ns} ns", c.cpu_ns);
    // Exact: the kernel's own fork and exit tracepoints, counted in the kernel.
    assert_eq!((c.processes_forked, c.processes_exited), (FORKS, FORKS));
    // hm-load itself was exec'd inside the worker.
    assert_eq!(c.execs, 1);

    let of = |kind: TaskEventKind| -> HashSet<u32> {
        events
            .iter()
            .filter(|e| e.task.worker == w.cgroup.id && e.kind == kind as u32)
            .filter(|e| kind != TaskEventKind::Exit || e.flags & EXIT_PROCESS != 0)
            .map(|e| e.task.tgid)
            .collect()
    };
    let (forked, exited) = (of(TaskEventKind::Fork), of(TaskEventKind::Exit));
    let lost = sample.probe_stats.events_lost;
    assert_eq!(forked.len() as u64 + lost.min(FORKS), FORKS, "every fork is an event or counted lost");
    assert!(events.iter().any(|e| e.kind == TaskEventKind::Exec as u32 && e.task.tgid == load.pid()));
    if lost == 0 {
        assert_eq!(forked, exited, "each child's exit was seen");
    }
    assert!(
        events.iter().filter(|e| e.kind == TaskEventKind::Fork as u32).all(|e| e.parent == load.pid()),
        "the parent of each fork is the load"
    );

    // The kernel keeps one entry for the worker, nothing per task; the loader follows only
    // the tasks still alive.
    assert_eq!(sampler.probes().unwrap().worker_ids().unwrap(), [w.cgroup.id]);
    // An exited task is kept until its final counters arrive (an RCU-delayed free can hold
    // them back for seconds), then forgotten.
    wait_for(
        || sampler.sample().is_ok() && sampler.probes().unwrap().tasks_followed() < 10,
        Duration::from_secs(40),
        "the ended children to be forgotten",
    );
}
