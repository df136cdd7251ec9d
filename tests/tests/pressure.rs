//! Pressure stall figures per worker against the worker cgroup's own `cpu.pressure`,
//! `memory.pressure` and `io.pressure`: two busy threads under `hive-monitor spawn
//! --cpu-max 0.5` stall on CPU, and each interval's share must equal the growth of the
//! file's `total` over that interval.
use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use hive_monitor_tests::*;
use monitor_user::{
    sample::{Sample, WorkerSample},
    sampler::{BpfMode, Sampler, SamplerOptions},
    sources::{cgroup::Slice, pressure::RESOURCES},
};

const DAEMON: &str = env!("CARGO_BIN_EXE_hm-daemon");
const HM_LOAD: &str = env!("CARGO_BIN_EXE_hm-load");
const TOLERANCE_PP: f64 = 0.5;
const INTERVALS: usize = 3;

/// `total` of the `some` or `full` line of `<dir>/<resource>.pressure`, in ns.
fn psi_total_ns(dir: &Path, resource: &str, kind: &str) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join(format!("{resource}.pressure"))).ok()?;
    let line = text.lines().find(|l| l.starts_with(&format!("{kind} ")))?;
    let us: u64 = line.split_whitespace().find_map(|f| f.strip_prefix("total="))?.parse().ok()?;
    Some(us * 1000)
}

fn worker(sample: &Sample) -> &WorkerSample {
    sample
        .workers
        .iter()
        .find(|w| &*w.cgroup.instance == "8080")
        .unwrap_or_else(|| panic!("no worker: {sample:#?}"))
}

/// Ends the spawned worker (spawn forwards SIGTERM and removes its cgroups).
struct Spawned(Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        // SAFETY: a plain signal to the child this test started.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// Worker `llm/8080` running `command` under `hive-monitor spawn --cpu-max 0.5`, once its
/// process is in; returns the test cgroup, the spawned daemon and the worker's directory.
fn spawn_half_core(name: &str, command: &[&str]) -> (TestCgroup, Spawned, std::path::PathBuf) {
    // On a hybrid host the CPU limit goes to the v1 cpu hierarchy.
    let cg = TestCgroup::with_v1(name, &["cpu"]).unwrap_or_else(|| TestCgroup::new(name));
    let spawned = Spawned(
        Command::new(DAEMON)
            .args(["spawn", "--cgroup-root", cg.root.to_str().unwrap(), "--slice", &cg.rel("rbee.slice")])
            .args(["--group", "llm", "--instance", "8080", "--cpu-max", "0.5", "--"])
            .args(command)
            .stdin(Stdio::null())
            .spawn()
            .expect("start hive-monitor spawn"),
    );
    let dir = cg.dir.join("rbee.slice/llm/8080");
    wait_for(
        || std::fs::read_to_string(dir.join("cgroup.procs")).is_ok_and(|p| !p.trim().is_empty()),
        Duration::from_secs(10),
        "the spawned worker's process",
    );
    (cg, spawned, dir)
}

#[test]
fn stall_shares_equal_the_growth_of_the_pressure_files() {
    if !bpf_available("pressure") {
        return;
    }
    let (cg, spawned, dir) = spawn_half_core("pressure", &[HM_LOAD, "busy", "2", "60"]);
    let slice = Slice::new(&cg.root, &cg.rel("rbee.slice")).expect("slice");
    let options = SamplerOptions { bpf: BpfMode::Off, ..Default::default() };
    let mut sampler = Sampler::with_options(slice, options).expect("sampler");

    // Frozen, the worker's tasks stall on nothing: the files stand still while both are read.
    let read_frozen = |sampler: &mut Sampler| {
        freeze(&dir);
        let sample = sampler.sample().expect("sample");
        let files: Vec<[Option<u64>; 2]> = RESOURCES
            .iter()
            .map(|r| [psi_total_ns(&dir, r, "some"), psi_total_ns(&dir, r, "full")])
            .collect();
        thaw(&dir);
        (worker(&sample).clone(), files)
    };
    let (mut prev, mut prev_files) = read_frozen(&mut sampler);
    let mut cpu_stalled = 0.0f64;
    for i in 0..INTERVALS {
        std::thread::sleep(Duration::from_secs(1));
        let (w, files) = read_frozen(&mut sampler);
        let interval = w.at_ns - prev.at_ns;
        for (r, resource) in RESOURCES.iter().enumerate() {
            let ours = w.pressure[r];
            if files[r][0].is_none() {
                assert!(ours.is_none(), "{resource}: no file, yet {ours:?}");
                continue;
            }
            let ours = ours.unwrap_or_else(|| panic!("{resource}.pressure exists but the figure is null"));
            for (k, (total, share)) in
                [(ours.some_ns, ours.some_pct), (ours.full_ns, ours.full_pct)].into_iter().enumerate()
            {
                let kind = ["some", "full"][k];
                assert_eq!(total, files[r][k], "interval {i}: {resource} {kind} total vs the file's");
                let (Some(now), Some(before)) = (files[r][k], prev_files[r][k]) else { continue };
                let kernel = (now - before) as f64 * 100.0 / interval as f64;
                let ours = share.unwrap_or_else(|| panic!("interval {i}: {resource} {kind} share null"));
                eprintln!("interval {i}: {resource} {kind}: monitor {ours:7.3} %  file {kernel:7.3} %");
                assert!(
                    (ours - kernel).abs() <= TOLERANCE_PP,
                    "interval {i}: {resource} {kind} share {ours} % vs the file's growth {kernel} %"
                );
                if (r, k) == (0, 0) {
                    cpu_stalled = cpu_stalled.max(kernel);
                }
            }
        }
        (prev, prev_files) = (w, files);
    }
    assert!(
        cpu_stalled > 10.0,
        "the load stalled on CPU only {cpu_stalled} % of an interval: not the case needed"
    );
    drop(spawned);
}

/// With the probes, a worker none of whose tasks can have stalled since the last pass keeps
/// the pressure it was last read with (its files are not read again). Its totals must still
/// equal the files' at every sample: while it sleeps, and once its tasks wake and stall on
/// CPU, when a carried value would lag by the whole interval's stall.
#[test]
fn an_idle_worker_s_pressure_is_carried_and_its_stalls_are_not_missed() {
    if !bpf_available("pressure_idle") {
        return;
    }
    let script = format!("sleep 4; exec {HM_LOAD} busy 2 60");
    let (cg, spawned, dir) = spawn_half_core("pressure_idle", &["sh", "-c", &script]);
    let slice = Slice::new(&cg.root, &cg.rel("rbee.slice")).expect("slice");
    let mut sampler = Sampler::with_options(slice, SamplerOptions::default()).expect("sampler");
    let (mut idle, mut stalled) = (0, 0);
    for i in 0..10 {
        std::thread::sleep(Duration::from_millis(800));
        let sample = sampler.sample().expect("sample");
        // Read right after the sample: the files can only have grown since, by what a few
        // milliseconds of stall add.
        let file = psi_total_ns(&dir, "cpu", "some");
        let ours = worker(&sample).pressure[0].and_then(|p| p.some_ns);
        let (Some(file), Some(ours)) = (file, ours) else {
            assert_eq!(file.is_some(), ours.is_some(), "sample {i}: file {file:?}, figure {ours:?}");
            return;
        };
        let behind =
            file.checked_sub(ours).unwrap_or_else(|| panic!("sample {i}: {ours} ns above the file's {file}"));
        eprintln!("sample {i}: cpu some {ours} ns, the file {file} ns ({behind} ns behind)");
        assert!(behind < 50_000_000, "sample {i}: the figure lags the file by {behind} ns");
        match worker(&sample).pressure[0].and_then(|p| p.some_pct) {
            Some(0.0) => idle += 1,
            Some(p) if p > 10.0 => stalled += 1,
            _ => {}
        }
    }
    assert!(idle >= 2 && stalled >= 3, "not the case needed: {idle} idle and {stalled} stalled intervals");
    drop(spawned);
}
