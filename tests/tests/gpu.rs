//! GPU figures through the daemon's real nvml-wrapper path, against the scripted NVML
//! library (`nvml-stub`): VRAM and utilisation land on the right worker across devices and
//! processes, only new utilisation samples count, and failures degrade as docs/design.md,
//! Degradation, says.
use std::{sync::Mutex, time::Duration};

use hive_monitor_tests::*;
use monitor_user::{
    heartbeat::{self, HiveIdentity},
    sample::{Sample, WorkerSample},
    sampler::{Sampler, SamplerOptions},
    sources::cgroup::Slice,
};
use serde_json::json;

const HM_LOAD: &str = env!("CARGO_BIN_EXE_hm-load");
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// The stub reads its scenario path from the environment, which the tests share.
static SERIAL: Mutex<()> = Mutex::new(());

struct Fleet {
    cg: TestCgroup,
    a: [Workload; 2],
    b: Workload,
    outsider: Workload,
    scenario: std::path::PathBuf,
}

/// Worker llm/a with two processes, embed/b with one, and a process outside the slice.
fn fleet(name: &str) -> Fleet {
    let cg = TestCgroup::new(name);
    let (a, b) = (cg.mkdir("rbee.slice/llm/a"), cg.mkdir("rbee.slice/embed/b"));
    let outside = cg.mkdir("elsewhere");
    let fleet = Fleet {
        a: [Workload::start(HM_LOAD, &a, &["sleep", "60"]), Workload::start(HM_LOAD, &a, &["sleep", "60"])],
        b: Workload::start(HM_LOAD, &b, &["sleep", "60"]),
        outsider: Workload::start(HM_LOAD, &outside, &["sleep", "60"]),
        scenario: std::env::temp_dir().join(format!("nvml-scenario-{}-{name}.json", std::process::id())),
        cg,
    };
    std::env::set_var("NVML_STUB_SCENARIO", &fleet.scenario);
    fleet
}

impl Fleet {
    fn write(&self, scenario: serde_json::Value) {
        std::fs::write(&self.scenario, scenario.to_string()).unwrap();
    }

    fn sampler(&self) -> Sampler {
        let slice = Slice::new(&self.cg.root, &self.cg.rel("rbee.slice")).unwrap();
        let options = SamplerOptions { nvml_lib: Some(nvml_stub()), ..Default::default() };
        Sampler::with_options(slice, options).expect("sampler")
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.scenario);
    }
}

fn device(
    index: u32,
    util: u32,
    compute: serde_json::Value,
    samples: serde_json::Value,
) -> serde_json::Value {
    json!({ "name": format!("Stub GPU {index}"), "uuid": format!("GPU-{index}"), "memory_total": 80 * GIB,
            "memory_used": 10 * GIB, "utilization_gpu": util, "utilization_memory": 5, "temperature": 50 + index,
            "compute": compute, "graphics": [], "samples": samples })
}

fn worker<'a>(s: &'a Sample, instance: &str) -> &'a WorkerSample {
    s.workers.iter().find(|w| &*w.cgroup.instance == instance).unwrap()
}

#[test]
fn vram_and_utilisation_land_on_the_right_worker() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !bpf_available("gpu_attribution") {
        return;
    }
    let f = fleet("gpu_attr");
    let (a1, a2, b, out) = (f.a[0].pid(), f.a[1].pid(), f.b.pid(), f.outsider.pid());
    let mut dev1 = device(
        1,
        95,
        json!([{ "pid": a2, "used_memory": 256 * MIB }]),
        json!([
        { "pid": b, "timestamp": 50, "sm_util": 30 }, { "pid": a2, "timestamp": 60, "sm_util": 10 }]),
    );
    dev1["graphics"] = json!([{ "pid": b, "used_memory": 3 * GIB }]);
    f.write(json!({ "devices": [
        device(0, 40, json!([{ "pid": a1, "used_memory": GIB }, { "pid": a2, "used_memory": 512 * MIB },
                             { "pid": out, "used_memory": 2 * GIB }]),
               json!([{ "pid": a1, "timestamp": 100, "sm_util": 40 }, { "pid": a1, "timestamp": 200, "sm_util": 60 },
                      { "pid": out, "timestamp": 150, "sm_util": 90 }])),
        dev1 ] }));
    let mut sampler = f.sampler();

    let s = sampler.sample().unwrap();
    let ga = worker(&s, "a").gpu.clone().expect("GPU figures for a");
    assert_eq!(ga.vram_bytes, Some(GIB + 512 * MIB + 256 * MIB), "two processes over two devices");
    assert_eq!(ga.sm_util_pct, Some(50.0 + 0.0 + 10.0), "mean of a1's samples; a2 has none on GPU 0");
    assert_eq!(ga.devices, vec![(0, Some(GIB + 512 * MIB), Some(50.0)), (1, Some(256 * MIB), Some(10.0))]);
    let gb = worker(&s, "b").gpu.clone().expect("GPU figures for b");
    assert_eq!((gb.vram_bytes, gb.sm_util_pct), (Some(3 * GIB), Some(30.0)), "graphics processes count too");
    let devices = s.gpus.as_ref().expect("devices");
    assert_eq!(devices.len(), 2);
    assert_eq!(
        (devices[1].memory_total, devices[1].utilization_pct, devices[1].temperature_c),
        (Some(80 * GIB), Some(95), Some(51))
    );
    assert_eq!(s.prewarm.len(), 1, "GPU 1 is above 80 %");
    assert_eq!(s.prewarm[0].device.index, 1);

    let hb = heartbeat::format(&s, &HiveIdentity { id: "h".into(), hostname: "h".into(), port: 1 }, 0);
    let json = serde_json::to_value(&hb).unwrap();
    let wa = json["workers"].as_array().unwrap().iter().find(|w| w["instance"] == "a").unwrap();
    assert_eq!((wa["vram_mb"].as_u64(), wa["gpu_util_pct"].as_f64()), (Some(1792), Some(60.0)));
    assert_eq!(json["hive"]["vram_per_device"][0]["vram_total_gb"], 80.0);
    assert_eq!(json["hive"]["vram_per_device"][0]["vram_utilization_percent"], 12.5);
    assert_eq!(json["collector"]["gpu"], "nvml");
    assert_eq!(json["prewarm"][0]["device_index"], 1);

    // The same samples again are not new: this interval saw no GPU work.
    std::thread::sleep(Duration::from_millis(50));
    let s = sampler.sample().unwrap();
    assert_eq!(worker(&s, "a").gpu.as_ref().unwrap().sm_util_pct, Some(0.0));
    assert!(s.prewarm.is_empty(), "at most one signal a minute per device");
}

#[test]
fn failures_degrade_without_fabricating() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !bpf_available("gpu_failures") {
        return;
    }
    let f = fleet("gpu_fail");
    let (a1, b) = (f.a[0].pid(), f.b.pid());
    let mut unsupported = device(1, 20, json!([{ "pid": b, "used_memory": GIB }]), json!([]));
    unsupported["not_supported"] = json!(["process_utilization"]);
    let mut lost = device(0, 20, json!([{ "pid": a1, "used_memory": GIB }]), json!([]));
    lost["lost"] = json!(true);
    f.write(json!({ "devices": [lost, unsupported] }));
    let mut sampler = f.sampler();
    let s = sampler.sample().unwrap();
    let devices = s.gpus.as_ref().expect("NVML works");
    assert_eq!(devices.iter().map(|d| d.index).collect::<Vec<_>>(), vec![1], "the lost GPU is dropped");
    let ga = worker(&s, "a").gpu.clone().unwrap();
    assert_eq!(
        (ga.vram_bytes, ga.sm_util_pct),
        (None, None),
        "a is on no GPU that answers: it may be on the lost one, so neither figure is known"
    );
    let gb = worker(&s, "b").gpu.clone().unwrap();
    assert_eq!((gb.vram_bytes, gb.sm_util_pct), (Some(GIB), None), "VRAM known, utilisation not supported");

    // Every device read, and b on none of them: a measured zero, which the reference's
    // idle test (`gpu_util_pct == 0.0`) relies on.
    f.write(json!({ "devices": [device(0, 20, json!([{ "pid": a1, "used_memory": GIB }]), json!([]))] }));
    let s = f.sampler().sample().unwrap();
    let gb = worker(&s, "b").gpu.clone().unwrap();
    assert_eq!((gb.vram_bytes, gb.sm_util_pct), (Some(0), Some(0.0)), "b uses no GPU");

    // A process whose memory the driver does not report: the worker's VRAM is not known,
    // not the sum of the rest.
    f.write(json!({ "devices": [device(0, 20, json!([{ "pid": a1, "used_memory": GIB }, { "pid": f.a[1].pid(), "used_memory": null }]), json!([]))] }));
    let s = f.sampler().sample().unwrap();
    assert_eq!(
        worker(&s, "a").gpu.clone().unwrap().vram_bytes,
        None,
        "one of a's processes has no reported VRAM"
    );

    // No library at all: GPU figures are absent, never zero; the collector says whether that
    // is because the host has no GPU (no NVIDIA driver loaded either) or NVML is missing.
    std::env::remove_var("NVML_STUB_SCENARIO");
    let mut sampler = f.sampler();
    let s = sampler.sample().unwrap();
    assert!(s.gpus.is_none() && s.workers.iter().all(|w| w.gpu.is_none()));
    let hb = serde_json::to_value(heartbeat::format(
        &s,
        &HiveIdentity { id: "h".into(), hostname: "h".into(), port: 1 },
        0,
    ))
    .unwrap();
    let why = if std::path::Path::new("/proc/driver/nvidia").exists() { "unavailable" } else { "none" };
    assert!(hb["hive"]["vram_per_device"].is_null() && hb["collector"]["gpu"] == why, "{}", hb["collector"]);
    assert!(hb["workers"]
        .as_array()
        .unwrap()
        .iter()
        .all(|w| w["vram_mb"].is_null() && w["gpu_util_pct"].is_null()));
}
