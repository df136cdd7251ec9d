//! A coordinator's reply to a heartbeat (the daemon's sender reads it).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = monitor_user::sinks::coordinator::parse_ack(data);
});
