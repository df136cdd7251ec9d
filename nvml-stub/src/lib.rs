//! A stand-in for `libnvidia-ml.so` that serves a scripted fleet, for tests on machines
//! without a GPU. It exports the calls hive-monitor makes, with the real library's calling
//! conventions: buffer-size probing answered with "insufficient size", "not found" when no
//! utilisation sample is newer than asked, the `_v2`/`_v3` struct layouts.
//!
//! The scenario is the JSON file named by `NVML_STUB_SCENARIO`, re-read on every call so a
//! test can change it between samples:
//!
//! ```json
//! { "devices": [ { "name": "Stub H100", "uuid": "GPU-1", "memory_total": 85899345920,
//!     "memory_used": 2147483648, "utilization_gpu": 90, "utilization_memory": 30,
//!     "temperature": 61, "lost": false, "not_supported": ["process_utilization"],
//!     "compute": [ { "pid": 4242, "used_memory": 1073741824 } ], "graphics": [],
//!     "samples": [ { "pid": 4242, "timestamp": 1000, "sm_util": 75 } ] } ] }
//! ```
//! `used_memory` may be `null` (the driver's "not available"). A missing or unreadable
//! scenario makes `nvmlInit_v2` fail with "library not found"… as a host without a GPU would.
#![allow(non_snake_case, clippy::missing_safety_doc)]

use std::{
    ffi::{c_char, c_uint, c_ulonglong},
    ptr,
};

use nvml_wrapper_sys::bindings::*;
use serde::Deserialize;

#[derive(Deserialize, Default)]
struct Scenario {
    #[serde(default)]
    devices: Vec<Device>,
}

#[derive(Deserialize)]
struct Device {
    name: String,
    uuid: String,
    memory_total: u64,
    memory_used: u64,
    utilization_gpu: u32,
    utilization_memory: u32,
    temperature: u32,
    #[serde(default)]
    lost: bool,
    #[serde(default)]
    not_supported: Vec<String>,
    #[serde(default)]
    compute: Vec<Process>,
    #[serde(default)]
    graphics: Vec<Process>,
    #[serde(default)]
    samples: Vec<Sample>,
}

#[derive(Deserialize, Clone, Copy)]
struct Process {
    pid: u32,
    used_memory: Option<u64>,
}

#[derive(Deserialize, Clone, Copy)]
struct Sample {
    pid: u32,
    timestamp: u64,
    sm_util: u32,
}

fn scenario() -> Option<Scenario> {
    let path = std::env::var_os("NVML_STUB_SCENARIO")?;
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Runs `f` on the device behind `handle`, answering for a lost or unknown one.
fn with_device(handle: nvmlDevice_t, call: &str, f: impl FnOnce(&Device) -> nvmlReturn_t) -> nvmlReturn_t {
    let Some(s) = scenario() else { return nvmlReturn_enum_NVML_ERROR_UNINITIALIZED };
    let Some(d) = (handle as usize).checked_sub(1).and_then(|i| s.devices.get(i)) else {
        return nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT;
    };
    if d.lost {
        return nvmlReturn_enum_NVML_ERROR_GPU_IS_LOST;
    }
    if d.not_supported.iter().any(|c| c == call) {
        return nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED;
    }
    f(d)
}

/// Copies `s` as a C string into `buf` of `len` bytes.
unsafe fn put_str(s: &str, buf: *mut c_char, len: c_uint) -> nvmlReturn_t {
    if buf.is_null() {
        return nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT;
    }
    if s.len() + 1 > len as usize {
        return nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_SIZE;
    }
    // SAFETY: `buf` is non-null and valid for `len` bytes (caller's contract), room for `s` and NUL.
    unsafe {
        ptr::copy_nonoverlapping(s.as_ptr().cast(), buf, s.len());
        *buf.add(s.len()) = 0;
    }
    nvmlReturn_enum_NVML_SUCCESS
}

/// The size-probing convention of the list calls: `*count` too small (or no buffer) is
/// answered with the needed count and "insufficient size".
unsafe fn put_list<T: Copy>(items: &[T], count: *mut c_uint, out: *mut T) -> nvmlReturn_t {
    if count.is_null() {
        return nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: `count` is checked non-null; `out`, valid for `room` items, is written only if `room` suffices.
    unsafe {
        let room = *count as usize;
        *count = items.len() as c_uint;
        if items.is_empty() {
            return nvmlReturn_enum_NVML_SUCCESS;
        }
        if out.is_null() || room < items.len() {
            return nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_SIZE;
        }
        ptr::copy_nonoverlapping(items.as_ptr(), out, items.len());
    }
    nvmlReturn_enum_NVML_SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlInit_v2() -> nvmlReturn_t {
    match scenario() {
        Some(_) => nvmlReturn_enum_NVML_SUCCESS,
        None => nvmlReturn_enum_NVML_ERROR_LIBRARY_NOT_FOUND,
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlShutdown() -> nvmlReturn_t {
    nvmlReturn_enum_NVML_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> nvmlReturn_t {
    let Some(s) = scenario() else { return nvmlReturn_enum_NVML_ERROR_UNINITIALIZED };
    if count.is_null() {
        return nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: `count` is non-null (checked above) and points to a writable c_uint, per the NVML API.
    unsafe { *count = s.devices.len() as c_uint };
    nvmlReturn_enum_NVML_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    let Some(s) = scenario() else { return nvmlReturn_enum_NVML_ERROR_UNINITIALIZED };
    match s.devices.get(index as usize) {
        None => nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT,
        Some(d) if d.lost => nvmlReturn_enum_NVML_ERROR_GPU_IS_LOST,
        Some(_) if device.is_null() => nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT,
        Some(_) => {
            // SAFETY: `device` is non-null (the guard above) and writable, per the NVML API.
            unsafe { *device = (index as usize + 1) as nvmlDevice_t };
            nvmlReturn_enum_NVML_SUCCESS
        }
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: nvmlDevice_t,
    name: *mut c_char,
    len: c_uint,
) -> nvmlReturn_t {
    // SAFETY: the NVML caller makes `name` valid for `len` bytes; put_str checks null and size.
    with_device(device, "name", |d| unsafe { put_str(&d.name, name, len) })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: nvmlDevice_t,
    uuid: *mut c_char,
    len: c_uint,
) -> nvmlReturn_t {
    // SAFETY: the NVML caller makes `uuid` valid for `len` bytes; put_str checks null and size.
    with_device(device, "uuid", |d| unsafe { put_str(&d.uuid, uuid, len) })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: nvmlDevice_t,
    memory: *mut nvmlMemory_v2_t,
) -> nvmlReturn_t {
    // SAFETY: `memory` is checked non-null first and points to an nvmlMemory_v2_t, per the NVML API.
    with_device(device, "memory_info", |d| unsafe {
        let expected = (std::mem::size_of::<nvmlMemory_v2_t>() | (2 << 24)) as c_uint;
        if memory.is_null() || (*memory).version != expected {
            return nvmlReturn_enum_NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
        }
        (*memory).total = d.memory_total;
        (*memory).used = d.memory_used;
        (*memory).free = d.memory_total.saturating_sub(d.memory_used);
        (*memory).reserved = 0;
        nvmlReturn_enum_NVML_SUCCESS
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(
    device: nvmlDevice_t,
    util: *mut nvmlUtilization_t,
) -> nvmlReturn_t {
    // SAFETY: `util` is checked non-null and points to an nvmlUtilization_t, per the NVML API.
    with_device(device, "utilization_rates", |d| unsafe {
        if util.is_null() {
            return nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT;
        }
        *util = nvmlUtilization_t { gpu: d.utilization_gpu, memory: d.utilization_memory };
        nvmlReturn_enum_NVML_SUCCESS
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTemperature(
    device: nvmlDevice_t,
    _sensor: nvmlTemperatureSensors_t,
    temp: *mut c_uint,
) -> nvmlReturn_t {
    // SAFETY: `temp` is checked non-null and points to a writable c_uint, per the NVML API.
    with_device(device, "temperature", |d| unsafe {
        if temp.is_null() {
            return nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT;
        }
        *temp = d.temperature;
        nvmlReturn_enum_NVML_SUCCESS
    })
}

fn process_infos(list: &[Process]) -> Vec<nvmlProcessInfo_t> {
    list.iter()
        .map(|p| nvmlProcessInfo_t {
            pid: p.pid,
            // NVML_VALUE_NOT_AVAILABLE
            usedGpuMemory: p.used_memory.unwrap_or(c_ulonglong::MAX),
            gpuInstanceId: u32::MAX,
            computeInstanceId: u32::MAX,
        })
        .collect()
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    device: nvmlDevice_t,
    count: *mut c_uint,
    infos: *mut nvmlProcessInfo_t,
) -> nvmlReturn_t {
    // SAFETY: the NVML caller makes `infos` valid for `*count` entries; put_list checks null and room.
    with_device(device, "compute_processes", |d| unsafe {
        put_list(&process_infos(&d.compute), count, infos)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetGraphicsRunningProcesses_v3(
    device: nvmlDevice_t,
    count: *mut c_uint,
    infos: *mut nvmlProcessInfo_t,
) -> nvmlReturn_t {
    // SAFETY: the NVML caller makes `infos` valid for `*count` entries; put_list checks null and room.
    with_device(device, "graphics_processes", |d| unsafe {
        put_list(&process_infos(&d.graphics), count, infos)
    })
}

/// Samples newer than `last_seen`; none is "not found", as the driver says.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetProcessUtilization(
    device: nvmlDevice_t,
    samples: *mut nvmlProcessUtilizationSample_t,
    count: *mut c_uint,
    last_seen: c_ulonglong,
) -> nvmlReturn_t {
    with_device(device, "process_utilization", |d| {
        let newer: Vec<nvmlProcessUtilizationSample_t> = d
            .samples
            .iter()
            .filter(|s| s.timestamp > last_seen)
            .map(|s| nvmlProcessUtilizationSample_t {
                pid: s.pid,
                timeStamp: s.timestamp,
                smUtil: s.sm_util,
                memUtil: 0,
                encUtil: 0,
                decUtil: 0,
            })
            .collect();
        if newer.is_empty() {
            return nvmlReturn_enum_NVML_ERROR_NOT_FOUND;
        }
        // SAFETY: the NVML caller makes `samples` valid for `*count` entries; put_list checks null and room.
        unsafe { put_list(&newer, count, samples) }
    })
}
