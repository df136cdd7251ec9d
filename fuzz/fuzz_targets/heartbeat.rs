//! The reference coordinator's `POST /v1/hive-heartbeat` body; what it accepts must also
//! serialise again (the registry answers `/v1/workers` with it).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(hb) = monitor_coordinator::parse_heartbeat(data) {
        serde_json::to_vec(&hb).expect("an accepted heartbeat serialises");
    }
});
