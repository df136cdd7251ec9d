//! The reference coordinator's `GET /v1/workers?…` query, then the filter it makes applied.
#![no_main]
use axum::{extract::Query, http::Uri};
use libfuzzer_sys::fuzz_target;
use monitor_wire::filter::WorkerFilter;

fuzz_target!(|data: &[u8]| {
    let Ok(query) = std::str::from_utf8(data) else { return };
    let Ok(uri) = format!("/v1/workers?{query}").parse::<Uri>() else { return };
    if let Ok(Query(filter)) = Query::<WorkerFilter>::try_from_uri(&uri) {
        let _ = filter.model.as_deref().map(str::len);
        let _ = (filter.idle, filter.min_free_vram_mb);
    }
});
