//! GPUs through NVML (nvml-wrapper): per-device vitals, and per-process VRAM and SM
//! utilisation. The library is opened once; a missing one means no GPU figures (logged once),
//! never zeros. A device that fails as lost is dropped and probed again later.
use std::{
    path::Path,
    time::{Duration, Instant},
};

use nvml_wrapper::{
    enum_wrappers::device::TemperatureSensor, enums::device::UsedGpuMemory, error::NvmlError, Nvml,
};
use rustc_hash::FxHashMap;

/// How long a lost device is left alone before it is probed again.
const REPROBE_AFTER: Duration = Duration::from_secs(10);

/// One device, as read this time; a figure the driver refused is `None`.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceReading {
    pub index: u32,
    pub name: Option<String>,
    pub uuid: Option<String>,
    pub utilization_pct: Option<u32>,
    pub temperature_c: Option<u32>,
    pub memory_total: Option<u64>,
    pub memory_used: Option<u64>,
}

/// A process on one device.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProcessOnDevice {
    pub device: u32,
    /// `None`: the driver does not say.
    pub vram_bytes: Option<u64>,
    /// Mean SM utilisation over the samples new since the last reading; 0 with none;
    /// `None` when the device cannot report per-process utilisation.
    pub sm_util_pct: Option<f64>,
}

#[derive(Clone, Debug, Default)]
pub struct GpuReading {
    pub devices: Vec<DeviceReading>,
    /// pid → its use of each device it is on.
    pub processes: FxHashMap<u32, Vec<ProcessOnDevice>>,
    /// Every device's process lists and per-process utilisation were read: a process on
    /// none of them uses no GPU (a measured zero, not a missing figure).
    pub complete: bool,
}

pub struct Gpus {
    nvml: Nvml,
    /// Per device index: the newest utilisation sample timestamp seen.
    last_seen: FxHashMap<u32, u64>,
    /// Devices found lost, and when.
    lost: FxHashMap<u32, Instant>,
}

/// Whether an NVIDIA kernel driver is loaded. Without NVML and without it, the host has no
/// GPU the figures could come from: a worker's GPU use is then known to be nothing.
pub fn driver_loaded() -> bool {
    std::path::Path::new("/proc/driver/nvidia").exists()
}

impl Gpus {
    /// Opens NVML (`lib`: a library path instead of the system's `libnvidia-ml.so`).
    /// `None` when there is no usable library: GPU figures are then unavailable.
    pub fn open(lib: Option<&Path>) -> Option<Self> {
        let mut builder = Nvml::builder();
        if let Some(lib) = lib {
            builder.lib_path(lib.as_os_str());
        }
        match builder.init() {
            Ok(nvml) => Some(Self { nvml, last_seen: FxHashMap::default(), lost: FxHashMap::default() }),
            Err(e) => {
                log::info!("no GPU figures: NVML unavailable ({e})");
                None
            }
        }
    }

    pub fn read(&mut self) -> GpuReading {
        let mut reading = GpuReading { complete: true, ..Default::default() };
        let count = match self.nvml.device_count() {
            Ok(n) => n,
            Err(e) => {
                log::warn!("NVML device count: {e}");
                reading.complete = false;
                return reading;
            }
        };
        for index in 0..count {
            if self.lost.get(&index).is_some_and(|at| at.elapsed() < REPROBE_AFTER) {
                reading.complete = false;
                continue;
            }
            match self.read_device(index, &mut reading) {
                Ok(()) => {
                    if self.lost.remove(&index).is_some() {
                        log::info!("GPU {index} is back");
                    }
                }
                Err(NvmlError::GpuLost) => {
                    log::warn!(
                        "GPU {index} lost; dropped from heartbeats, probed again in {REPROBE_AFTER:?}"
                    );
                    self.lost.insert(index, Instant::now());
                    self.last_seen.remove(&index);
                    reading.complete = false;
                }
                Err(e) => {
                    log::warn!("GPU {index}: {e}");
                    reading.complete = false;
                }
            }
        }
        reading
    }

    /// Reads one device into `reading`. Only a failure of the device as a whole is an
    /// error; a single refused figure is left out.
    fn read_device(&mut self, index: u32, reading: &mut GpuReading) -> Result<(), NvmlError> {
        let device = self.nvml.device_by_index(index)?;
        let name = device.name();
        let memory = device.memory_info();
        if matches!(name, Err(NvmlError::GpuLost)) || matches!(memory, Err(NvmlError::GpuLost)) {
            return Err(NvmlError::GpuLost);
        }
        let (memory_total, memory_used) = match memory {
            Ok(m) if m.used <= m.total => (Some(m.total), Some(m.used)),
            Ok(m) => {
                log::warn!(
                    "GPU {index}: driver reports {} bytes used of {}; memory left out",
                    m.used,
                    m.total
                );
                (None, None)
            }
            Err(_) => (None, None),
        };

        // A process may hold compute and graphics contexts; the driver reports its memory
        // in both lists.
        let mut vram: FxHashMap<u32, Option<u64>> = FxHashMap::default();
        for list in [device.running_compute_processes(), device.running_graphics_processes()] {
            match list {
                Ok(list) => {
                    for p in list {
                        let used = match p.used_gpu_memory {
                            UsedGpuMemory::Used(b) => memory_total.map_or(Some(b), |t| (b <= t).then_some(b)),
                            UsedGpuMemory::Unavailable => None,
                        };
                        let slot = vram.entry(p.pid).or_insert(used);
                        *slot = (*slot).max(used);
                    }
                }
                Err(NvmlError::GpuLost) => return Err(NvmlError::GpuLost),
                Err(e) => {
                    log::debug!("GPU {index} processes: {e}");
                    reading.complete = false;
                }
            }
        }

        let last_seen = self.last_seen.get(&index).copied();
        let mut util: Option<FxHashMap<u32, (f64, u32)>> = Some(FxHashMap::default());
        match device.process_utilization_stats(last_seen) {
            Ok(samples) => {
                let sums = util.as_mut().expect("set above");
                for s in samples {
                    let e = sums.entry(s.pid).or_insert((0.0, 0));
                    *e = (e.0 + f64::from(s.sm_util), e.1 + 1);
                    self.last_seen
                        .insert(index, self.last_seen.get(&index).copied().unwrap_or(0).max(s.timestamp));
                }
            }
            Err(NvmlError::NotFound) => {} // no sample newer than the last one seen
            Err(NvmlError::GpuLost) => return Err(NvmlError::GpuLost),
            Err(e) => {
                log::debug!("GPU {index} process utilisation: {e}");
                util = None;
                reading.complete = false;
            }
        }

        for (pid, vram_bytes) in vram {
            // Only processes that exist here: the driver can list one from another namespace
            // or one that just exited.
            if !Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            let sm_util_pct = util.as_ref().map(|u| u.get(&pid).map_or(0.0, |(sum, n)| sum / f64::from(*n)));
            reading.processes.entry(pid).or_default().push(ProcessOnDevice {
                device: index,
                vram_bytes,
                sm_util_pct,
            });
        }
        reading.devices.push(DeviceReading {
            index,
            name: name.ok(),
            uuid: device.uuid().ok(),
            utilization_pct: device.utilization_rates().ok().map(|u| u.gpu),
            temperature_c: device.temperature(TemperatureSensor::Gpu).ok(),
            memory_total,
            memory_used,
        });
        Ok(())
    }
}
