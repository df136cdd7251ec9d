//! A coordinator's reply to a heartbeat, as the daemon's sender reads it.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(ack) = serde_json::from_slice::<monitor_wire::ack::Ack>(data) {
        serde_json::to_vec(&ack).expect("an accepted acknowledgement serialises");
    }
});
