//! An event of a hive's heartbeat stream, as the reference coordinator reads it: what it
//! accepts must also serialise again and answer its filters.
#![no_main]
use libfuzzer_sys::fuzz_target;
use monitor_wire::{filter::Facts, rbee::HiveEvent};

fuzz_target!(|data: &[u8]| {
    if let Ok(event) = serde_json::from_slice::<HiveEvent>(data) {
        serde_json::to_vec(&event).expect("an accepted event serialises");
        let HiveEvent::Telemetry { workers, .. } = &event;
        for w in workers {
            let _ = Facts::of_stats(w).gpu_util_pct;
        }
    }
});
