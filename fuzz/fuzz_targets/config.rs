//! The TOML config file (`--config`, read again on SIGHUP).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = monitor_config::Config::parse(text);
    }
});
