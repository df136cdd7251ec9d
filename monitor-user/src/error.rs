//! The daemon's one error type: every variant says what failed and on what.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "hive-monitor needs CAP_BPF and CAP_PERFMON (or root) to load its probes; \
         this process lacks {missing}. Run it as root or grant those capabilities"
    )]
    NotPrivileged { missing: &'static str },

    #[error("kernel BTF not readable at {path}: {reason} (the kernel needs CONFIG_DEBUG_INFO_BTF)")]
    NoBtf { path: PathBuf, reason: String },

    #[error("kernel BTF: {0}")]
    Btf(String),

    #[error("loading the eBPF object failed: {0}")]
    Load(#[from] aya::EbpfError),

    #[error("eBPF program `{program}`: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },

    #[error("no eBPF program could be attached: {0}")]
    NoProgram(String),

    #[error("reading the task iterator: {0}")]
    Iterator(String),

    #[error("eBPF map `{map}`: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },

    #[error(
        "another hive-monitor{} already watches {slice} (lock {lock}); stop it first, or \
         give this one another --slice",
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    AlreadyRunning { slice: PathBuf, lock: PathBuf, pid: Option<u32> },

    #[error("dropping capabilities: {0}")]
    Privilege(String),

    #[error("no cgroup2 file system at /sys/fs/cgroup or /sys/fs/cgroup/unified; pass --cgroup-root")]
    NoCgroup2,

    #[error("{path} is not a cgroup2 directory")]
    NotCgroup2 { path: PathBuf },

    #[error("invalid slice path `{0}`: it must be relative, with no `.`, `..` or empty parts")]
    BadSlice(String),

    #[error("invalid {what} name {name:?}: use 1 to 64 characters, no `/`, NUL or control characters, not `.` or `..`")]
    BadName { what: &'static str, name: String },

    #[error("worker {0} already exists; pick another instance or remove that cgroup")]
    InstanceExists(PathBuf),

    #[error("{limit} cannot be applied: {reason}")]
    LimitUnavailable { limit: &'static str, reason: String },

    #[error("cgroup {path}: {message}")]
    Cgroup { path: String, message: String },

    #[error("unknown user {0:?}")]
    UnknownUser(String),

    #[error("cannot start {command:?}: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },

    #[error(transparent)]
    Config(#[from] monitor_config::ConfigError),

    #[error("pull API on {addr}: {reason}")]
    Api { addr: std::net::SocketAddr, reason: String },

    #[error("coordinator {url}: {reason}")]
    Coordinator { url: String, reason: String },

    /// `hive-monitor coordinator`, the reference coordinator.
    #[error(transparent)]
    ReferenceCoordinator(#[from] monitor_coordinator::Error),

    #[error("otlp endpoint {url}: {reason}")]
    Otlp { url: String, reason: String },

    #[error("daemon pull API {url}: {reason}")]
    Pull { url: String, reason: String },

    #[error("record {path}: {reason}")]
    Record { path: PathBuf, reason: String },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
