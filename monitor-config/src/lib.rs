//! The TOML configuration file (`--config FILE`): every `run` setting as a key of the same
//! name (`interval = "500ms"`, `coordinator = "http://queen:7833"`, …). Flags override it;
//! an unknown key, a malformed value or an out-of-range one is an error naming the file.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Deserializer};

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub slice: Option<String>,
    pub cgroup_root: Option<PathBuf>,
    #[serde(default, deserialize_with = "interval")]
    pub interval: Option<Duration>,
    pub hive_id: Option<String>,
    pub nvml_lib: Option<PathBuf>,
    pub prewarm_threshold: Option<f64>,
    pub model_dir: Option<PathBuf>,
    pub coordinator: Option<String>,
    pub coordinator_protocol: Option<Protocol>,
    pub advertise_url: Option<String>,
    pub token_file: Option<PathBuf>,
    #[serde(default, deserialize_with = "interval")]
    pub timeout: Option<Duration>,
    pub otlp_endpoint: Option<String>,
    pub listen: Option<SocketAddr>,
    pub api_token_file: Option<PathBuf>,
    pub max_workers: Option<u32>,
    pub record: Option<PathBuf>,
    #[serde(default, deserialize_with = "retention")]
    pub record_retention: Option<Duration>,
    #[serde(default, deserialize_with = "size")]
    pub record_max_size: Option<u64>,
}

/// How heartbeats reach the coordinator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// The coordinator subscribes to `/v1/heartbeats/stream` once told `/v1/hive/ready`.
    Stream,
    /// Each heartbeat is `POST`ed to `/v1/hive-heartbeat`.
    Push,
}

/// A config file that cannot be read, or says something wrong.
#[derive(Debug, thiserror::Error)]
#[error("config {path}: {reason}")]
pub struct ConfigError {
    pub path: PathBuf,
    pub reason: String,
}

/// Config files are small; anything larger is not one.
const MAX_SIZE: u64 = 64 * 1024;

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let err = |reason: String| ConfigError { path: path.to_path_buf(), reason };
        let size = std::fs::metadata(path).map_err(|e| err(e.to_string()))?.len();
        if size > MAX_SIZE {
            return Err(err(format!("{size} bytes; a config file is at most {MAX_SIZE}")));
        }
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        Self::parse(&text).map_err(err)
    }

    /// A config file's text; the error says what is wrong, not where the file is.
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let config: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        if let Some(p) = config.prewarm_threshold {
            if !(0.0..=100.0).contains(&p) {
                return Err(format!("prewarm_threshold {p} is not a percentage between 0 and 100"));
            }
        }
        if let Some(v) = config.max_workers.filter(|v| !(1..=MAX_WORKERS_LIMIT).contains(v)) {
            return Err(format!("max_workers {v} is outside 1..={MAX_WORKERS_LIMIT}"));
        }
        Ok(config)
    }
}

/// The most workers an operator may ask the kernel to keep counters for: the map is
/// allocated up front, per CPU.
pub const MAX_WORKERS_LIMIT: u32 = 1 << 20;

/// A duration written as text (`"1s"`, `"500ms"`), between 10 ms and 1 h.
pub fn parse_interval(s: &str) -> std::result::Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("`{s}`: {e} (examples: 1s, 500ms)"))?;
    if d < Duration::from_millis(10) || d > Duration::from_secs(3600) {
        return Err(format!("`{s}` is outside 10ms..1h"));
    }
    Ok(d)
}

fn interval<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    parse_interval(&s).map(Some).map_err(serde::de::Error::custom)
}

fn retention<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    parse_retention(&s).map(Some).map_err(serde::de::Error::custom)
}

fn size<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<u64>, D::Error> {
    let s = String::deserialize(d)?;
    parse_size(&s).map(Some).map_err(serde::de::Error::custom)
}

/// A retention written as text: `7d`, `12h`, … (at least one second).
pub fn parse_retention(s: &str) -> std::result::Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("`{s}`: {e} (examples: 7d, 12h)"))?;
    if d < Duration::from_secs(1) {
        return Err(format!("`{s}` is shorter than a second"));
    }
    Ok(d)
}

/// Parses `512M`, `8G`, `1.5G`, `1048576` (binary units, an optional `i` and `B`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix(['B', 'b']).unwrap_or(t);
    let t = t.strip_suffix('i').unwrap_or(t);
    let (num, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        Some('T' | 't') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let value: f64 = num.trim().parse().map_err(|_| format!("`{s}` is not a size (examples: 512M, 8G)"))?;
    let bytes = value * (1u64 << shift) as f64;
    if value.is_nan() || value <= 0.0 || !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("`{s}` is not a positive size below 16 EiB"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("8G"), Ok(8 << 30));
        assert_eq!(parse_size("8GiB"), Ok(8 << 30));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        for bad in ["", "G", "-1G", "0", "abc", "1e30T", "NaN"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn retentions() {
        assert_eq!(parse_retention("7d"), Ok(Duration::from_secs(7 * 86400)));
        assert!(parse_retention("0s").is_err() && parse_retention("forever").is_err());
    }

    fn parse(text: &str) -> std::result::Result<Config, String> {
        let path = std::env::temp_dir().join(format!("hm-config-{}-{}.toml", std::process::id(), text.len()));
        std::fs::write(&path, text).unwrap();
        let r = Config::load(&path).map_err(|e| e.to_string());
        let _ = std::fs::remove_file(&path);
        r
    }

    #[test]
    fn every_key() {
        let c = parse(
            r#"slice = "a/rbee.slice"
            cgroup_root = "/sys/fs/cgroup/unified"
            interval = "500ms"
            hive_id = "gpu-7"
            nvml_lib = "/opt/nvml.so"
            prewarm_threshold = 90.5
            model_dir = "/models"
            coordinator = "http://queen:7833"
            token_file = "/etc/hive/token"
            timeout = "2s"
            listen = "0.0.0.0:7835"
            api_token_file = "/etc/hive/api-token"
            record = "/var/lib/hive-monitor/record"
            record_retention = "3d"
            record_max_size = "500M"
            "#,
        )
        .unwrap();
        assert_eq!(c.interval, Some(Duration::from_millis(500)));
        assert_eq!(c.listen, Some("0.0.0.0:7835".parse().unwrap()));
        assert_eq!((c.prewarm_threshold, c.slice.as_deref()), (Some(90.5), Some("a/rbee.slice")));
        assert_eq!(c.record_retention, Some(Duration::from_secs(3 * 86400)));
        assert_eq!(c.record_max_size, Some(500 << 20));
        assert_eq!(parse("").unwrap(), Config::default());
    }

    #[test]
    fn the_shipped_example_parses() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/config.example.toml");
        let c = Config::load(&example).unwrap();
        assert_eq!((c.slice.as_deref(), c.prewarm_threshold), (Some("rbee.slice"), Some(80.0)));
        assert_eq!(c.max_workers, Some(4096));
    }

    #[test]
    fn hostile_configs_are_clear_errors() {
        for (text, says) in [
            ("intervall = \"1s\"", "unknown field `intervall`"),
            ("interval = \"soon\"", "examples: 1s, 500ms"),
            ("interval = \"0s\"", "outside 10ms..1h"),
            ("interval = 5", "invalid type"),
            ("prewarm_threshold = 1e300", "not a percentage"),
            ("listen = \"everywhere\"", "invalid socket address"),
            ("slice = [", "unclosed array"),
            ("max_workers = 0", "outside 1..="),
            ("max_workers = 99999999", "outside 1..="),
            ("max_workers = -1", "invalid value"),
            ("record_retention = \"forever\"", "examples: 7d"),
            ("record_max_size = \"-1G\"", "not a positive size"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains("config ") && e.contains(says), "{text:?}: {e}");
        }
        let huge = format!("hive_id = \"{}\"", "x".repeat(100_000));
        assert!(parse(&huge).unwrap_err().contains("at most"));
    }
}
