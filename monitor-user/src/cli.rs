//! The `hive-monitor` command line: subcommands wire probes, sources, sampler and sinks
//! together, nothing more.
use std::{
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, Condvar, Mutex},
    time::Duration,
};

use clap::{Args, Parser, Subcommand};
use monitor_config::{parse_interval, parse_retention, parse_size, Config, Protocol, MAX_WORKERS_LIMIT};
use monitor_wire::rbee::Ready;

use crate::{
    error::Error,
    heartbeat::{self, HiveIdentity},
    lock::SliceLock,
    probes::{monotonic_ns, MapSizes},
    sampler::{BpfMode, Sampler, SamplerOptions},
    sinks::{announce::Announcer, api::PullApi, coordinator::Coordinator, stdout::Stdout},
    sources::cgroup::{self, Slice},
    spawn, top,
};

/// Port the hive advertises in its heartbeat (the reference's default).
const DEFAULT_PORT: u16 = 7835;
const DEFAULT_LISTEN: &str = "127.0.0.1:7835";
const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_PREWARM_PCT: f64 = 80.0;

fn default_listen() -> std::net::SocketAddr {
    DEFAULT_LISTEN.parse().expect("a socket address")
}

#[derive(Parser)]
#[command(name = "hive-monitor", version, about = "eBPF monitor of inference workers in a cgroup slice")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Sample the workers every interval and print one heartbeat JSON line each time.
    Run(RunArgs),
    /// Create a worker cgroup `<slice>/<group>/<instance>`, apply limits, run CMD in it, and
    /// exit with CMD's status; the cgroup is removed when CMD exits.
    Spawn(SpawnArgs),
    /// A live table of the workers: from the local daemon's pull API when it answers,
    /// else from probes this command loads itself.
    Top(TopArgs),
    /// Print recorded heartbeats (`run --record DIR`) as JSON lines, as they were sent.
    Replay(ReplayArgs),
    /// Print the heartbeat's JSON Schema.
    Schema,
    /// A reference coordinator: receives heartbeats pushed by hives or subscribes to the
    /// streams of hives that announce themselves, and answers
    /// `GET /v1/workers?idle=true&model=M&min_free_vram_mb=N` and `GET /v1/hives`.
    Coordinator(CoordinatorArgs),
}

#[derive(Args)]
struct CoordinatorArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7833")]
    listen: std::net::SocketAddr,
    /// File holding the bearer token hives must send; needed off loopback.
    #[arg(long)]
    token_file: Option<PathBuf>,
}

#[derive(Args)]
struct ReplayArgs {
    /// The directory given to `run --record`.
    #[arg(long, value_name = "DIR")]
    record: PathBuf,
    /// From this time: RFC 3339 (`2026-11-24T10:00:00Z`) or relative (`10 min ago`).
    #[arg(long, value_name = "TIME")]
    from: Option<String>,
    /// Up to this time, same forms [default: the newest].
    #[arg(long, value_name = "TIME")]
    to: Option<String>,
    /// Only this worker: heartbeats that hold it, with only it in `workers`.
    #[arg(long, value_name = "GROUP/INSTANCE")]
    worker: Option<String>,
}

#[derive(Args)]
struct TopArgs {
    #[command(flatten)]
    cgroup: CgroupArgs,
    /// Where the local daemon's pull API listens [default: 127.0.0.1:7835].
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Refresh period: `1s`, `500ms`, … (10ms to 1h) [default: 1s].
    #[arg(long, value_parser = parse_interval)]
    interval: Option<Duration>,
    /// Identity of this host [default: the host name].
    #[arg(long)]
    hive_id: Option<String>,
    /// Show recorded heartbeats from this directory (`run --record DIR`) instead of live ones.
    #[arg(long, value_name = "DIR", requires = "at")]
    record: Option<PathBuf>,
    /// With --record: the moment to show, RFC 3339 or relative (`10 min ago`).
    #[arg(long, value_name = "TIME", requires = "record")]
    at: Option<String>,
}

#[derive(Args)]
struct SpawnArgs {
    #[command(flatten)]
    cgroup: CgroupArgs,
    /// The worker's group, e.g. `llm`.
    #[arg(long)]
    group: String,
    /// The worker's instance, e.g. `8080`; refused if it already exists.
    #[arg(long)]
    instance: String,
    /// Memory limit: `512M`, `8G`, … (binary units).
    #[arg(long, value_parser = parse_size)]
    memory_max: Option<u64>,
    /// CPU limit in cores: `0.5`, `2`, …
    #[arg(long, value_parser = spawn::parse_cores)]
    cpu_max: Option<f64>,
    /// Run CMD as this user (with its groups).
    #[arg(long)]
    user: Option<String>,
    /// Set an environment variable for CMD; repeatable.
    #[arg(long, value_name = "KEY=VALUE", value_parser = spawn::parse_env)]
    env: Vec<(String, String)>,
    /// Keep the cgroup when CMD exits.
    #[arg(long)]
    keep: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

#[derive(Args)]
struct CgroupArgs {
    /// TOML file with any `run` setting as a key of the same name; flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The slice's path below the cgroup2 root; may be nested (`a/b/rbee.slice`) [default: rbee.slice].
    #[arg(long)]
    slice: Option<String>,
    /// The cgroup2 mount [default: /sys/fs/cgroup on unified hosts, /sys/fs/cgroup/unified on hybrid ones].
    #[arg(long)]
    cgroup_root: Option<PathBuf>,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    cgroup: CgroupArgs,
    /// Time between heartbeats: `1s`, `500ms`, … (10ms to 1h) [default: 1s].
    #[arg(long, value_parser = parse_interval)]
    interval: Option<Duration>,
    /// Exit 0 after this many heartbeats.
    #[arg(long)]
    count: Option<u64>,
    /// Identity of this host in heartbeats [default: the host name].
    #[arg(long)]
    hive_id: Option<String>,
    /// NVML library to load instead of the system's libnvidia-ml.so.
    #[arg(long)]
    nvml_lib: Option<PathBuf>,
    /// GPU utilisation (%) above which a pre-warm signal is sent, at most once a minute per
    /// device [default: 80].
    #[arg(long, value_parser = parse_percent)]
    prewarm_threshold: Option<f64>,
    /// Directory the models are stored in; its file system's usage goes in each heartbeat.
    #[arg(long)]
    model_dir: Option<PathBuf>,
    /// Send heartbeats to this coordinator instead of printing them, as
    /// `--coordinator-protocol` says.
    #[arg(long, value_name = "URL")]
    coordinator: Option<String>,
    /// `stream`: announce this hive with `POST URL/v1/hive/ready`, and the coordinator
    /// subscribes to `/v1/heartbeats/stream` (today's rbee queen). `push`: `POST` each
    /// heartbeat to `URL/v1/hive-heartbeat` [default: stream].
    #[arg(long, value_enum)]
    coordinator_protocol: Option<Protocol>,
    /// The URL the coordinator reaches the pull API at, sent in stream mode
    /// [default: http://<the --listen address>, the host name for 0.0.0.0].
    #[arg(long, value_name = "URL")]
    advertise_url: Option<String>,
    /// File holding the bearer token for the coordinator (push mode).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Timeout of each request to the coordinator or the OTLP collector [default: 5s].
    #[arg(long, value_parser = parse_interval)]
    timeout: Option<Duration>,
    /// Also push each heartbeat's figures as OTLP metrics (HTTP/protobuf) to
    /// `URL/v1/metrics`, e.g. `http://collector:4318`; each request times out after `--timeout`.
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// Where the pull API (/v1/heartbeat, /v1/heartbeats/stream, /v1/capabilities, /metrics,
    /// /healthz) listens;
    /// port 0 picks a free one [default: 127.0.0.1:7835].
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// File holding the bearer token the pull API requires; needed off loopback.
    #[arg(long)]
    api_token_file: Option<PathBuf>,
    /// Workers the kernel keeps counters for; beyond it a worker's probed figures are null
    /// and collector.probes.workers_map_full counts the lost events [default: 4096].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_WORKERS_LIMIT)))]
    max_workers: Option<u32>,
    /// Keep every heartbeat in a record under this directory (`hive-monitor replay`).
    #[arg(long, value_name = "DIR")]
    record: Option<PathBuf>,
    /// Drop recorded heartbeats older than this: `7d`, `12h`, … [default: 7d].
    #[arg(long, value_parser = parse_retention)]
    record_retention: Option<Duration>,
    /// Drop the oldest recorded heartbeats beyond this size on disk: `1G`, `500M`, … [default: 1G].
    #[arg(long, value_parser = parse_size)]
    record_max_size: Option<u64>,
    /// Do not load the probes (also the fallback when they cannot be loaded): CPU from each
    /// worker's cpu.stat; run-queue wait and context switches are then unavailable.
    #[arg(long)]
    no_bpf: bool,
}

/// The bounds within which a coordinator's `next_interval_ms` is honoured.
const ACK_INTERVAL_MS: std::ops::RangeInclusive<u64> = 100..=60_000;

/// Where heartbeats go (besides the pull API, which always serves them).
enum Sink {
    Stdout(Stdout),
    Push(Coordinator),
    /// The coordinator subscribes to the pull API's stream; held for its thread, which
    /// announces this hive until the sink is dropped.
    Stream(#[allow(dead_code)] Announcer),
}

fn read_token(path: &std::path::Path) -> Result<String, Error> {
    monitor_coordinator::http::read_token_file(path).map_err(|e| Error::io(path, e))
}

fn parse_percent(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=100.0).contains(&v) => Ok(v),
        _ => Err(format!("`{s}` is not a percentage between 0 and 100")),
    }
}

/// Parses the command line, runs the subcommand, and says why it failed if it did.
pub fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Stderr)
        .init();
    let result = match Cli::parse().command {
        Command::Run(args) => run(args).map(|()| 0),
        Command::Spawn(args) => spawn(args),
        Command::Top(args) => top(args).map(|()| 0),
        Command::Replay(args) => crate::record::replay(
            &args.record,
            args.from.as_deref(),
            args.to.as_deref(),
            args.worker.as_deref(),
        )
        .map(|()| 0),
        Command::Coordinator(args) => {
            let token = args.token_file.as_deref().map(read_token).transpose();
            token.and_then(|token| Ok(monitor_coordinator::run(args.listen, token)?)).map(|()| 0)
        }
        Command::Schema => {
            println!("{:#}", crate::heartbeat::schema().as_value());
            Ok(0)
        }
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

impl CgroupArgs {
    /// The config file's settings, and the slice from flags, config or defaults.
    fn load(&self) -> Result<(Config, Slice), Error> {
        let config = self.config.as_deref().map(Config::load).transpose()?.unwrap_or_default();
        let root = match self.cgroup_root.clone().or_else(|| config.cgroup_root.clone()) {
            Some(root) => root,
            None => cgroup::detect_root()?,
        };
        let slice = self.slice.as_deref().or(config.slice.as_deref()).unwrap_or("rbee.slice");
        let slice = Slice::new(root, slice)?;
        Ok((config, slice))
    }
}

fn top(args: TopArgs) -> Result<(), Error> {
    let (config, slice) = args.cgroup.load()?;
    let listen = args.listen.or(config.listen).unwrap_or_else(default_listen);
    let interval = args.interval.or(config.interval).unwrap_or(DEFAULT_INTERVAL);
    if let (Some(dir), Some(at)) = (&args.record, &args.at) {
        return top::run_recorded(dir, at);
    }
    top::run(slice, &listen.to_string(), interval, identity(args.hive_id.or(config.hive_id)))
}

fn spawn(args: SpawnArgs) -> Result<i32, Error> {
    let spec = spawn::SpawnSpec {
        group: args.group,
        instance: args.instance,
        memory_max: args.memory_max,
        cpu_max: args.cpu_max,
        user: args.user,
        env: args.env,
        keep: args.keep,
        command: args.command,
    };
    spawn::run(&args.cgroup.load()?.1, &spec)
}

/// Why the wait for the next sample ended.
enum Woken {
    Deadline,
    Stop,
    Hangup,
}

/// SIGTERM, SIGINT and SIGHUP, taken by a thread of their own so that the wait for the next
/// sample sleeps until its deadline (or a signal) instead of waking up to poll a flag.
struct Signals {
    /// (stop requested, hangup not yet handled)
    state: Mutex<(bool, bool)>,
    wake: Condvar,
}

impl Signals {
    fn install() -> Result<Arc<Self>, Error> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let mut incoming = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
            .map_err(|e| Error::io("signal handler", e))?;
        let me = Arc::new(Self { state: Mutex::new((false, false)), wake: Condvar::new() });
        let shared = Arc::clone(&me);
        crate::privilege::spawn_unprivileged("signals", move || {
            for signal in incoming.forever() {
                let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
                match signal {
                    SIGHUP => state.1 = true,
                    _ => state.0 = true,
                }
                shared.wake.notify_all();
            }
        })
        .map_err(|e| Error::io("signal thread", e))?;
        Ok(me)
    }

    /// Sleeps until CLOCK_MONOTONIC reaches `deadline_ns` or a signal comes; a stop wins
    /// over a hangup, which is reported once.
    fn wait_until(&self, deadline_ns: u64) -> Woken {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match *state {
                (true, _) => return Woken::Stop,
                (false, true) => {
                    state.1 = false;
                    return Woken::Hangup;
                }
                _ => {}
            }
            let now = monotonic_ns();
            if now >= deadline_ns {
                return Woken::Deadline;
            }
            // std's condition variable times out on the monotonic clock.
            let wait = Duration::from_nanos(deadline_ns - now);
            state = self.wake.wait_timeout(state, wait).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

/// The `run` settings that can change while running: flags, then the config file (read
/// again on SIGHUP), then defaults.
#[derive(Clone, Debug, PartialEq)]
struct Settings {
    interval: Duration,
    hive_id: Option<String>,
    prewarm_threshold_pct: f64,
    model_dir: Option<PathBuf>,
    coordinator: Option<String>,
    protocol: Protocol,
    advertise_url: Option<String>,
    token_file: Option<PathBuf>,
    timeout: Duration,
}

impl Settings {
    fn resolve(args: &RunArgs, config: &Config) -> Result<Self, Error> {
        let settings = Settings {
            interval: args.interval.or(config.interval).unwrap_or(DEFAULT_INTERVAL),
            hive_id: args.hive_id.clone().or_else(|| config.hive_id.clone()),
            prewarm_threshold_pct: args
                .prewarm_threshold
                .or(config.prewarm_threshold)
                .unwrap_or(DEFAULT_PREWARM_PCT),
            model_dir: args.model_dir.clone().or_else(|| config.model_dir.clone()),
            coordinator: args.coordinator.clone().or_else(|| config.coordinator.clone()),
            protocol: args.coordinator_protocol.or(config.coordinator_protocol).unwrap_or(Protocol::Stream),
            advertise_url: args.advertise_url.clone().or_else(|| config.advertise_url.clone()),
            token_file: args.token_file.clone().or_else(|| config.token_file.clone()),
            timeout: args.timeout.or(config.timeout).unwrap_or(DEFAULT_TIMEOUT),
        };
        if settings.token_file.is_some() && settings.coordinator.is_none() {
            return Err(Error::io("--token-file", std::io::Error::other("a token file needs --coordinator")));
        }
        Ok(settings)
    }

    fn sink(&self, api: &PullApi) -> Result<Sink, Error> {
        let token = self.token_file.as_deref().map(read_token).transpose()?;
        let Some(url) = &self.coordinator else { return Ok(Sink::Stdout(Stdout::new())) };
        Ok(match self.protocol {
            Protocol::Push => Sink::Push(Coordinator::start(url, token, self.timeout)?),
            Protocol::Stream => {
                if token.is_some() {
                    log::warn!(
                        "--token-file is for push mode; in stream mode the coordinator calls this daemon"
                    );
                }
                let hive_url = match &self.advertise_url {
                    Some(u) => advertised(u)?,
                    None => advertised_from(api.addr),
                };
                let ready = Ready { hive_id: identity(self.hive_id.clone()).id, hive_url };
                Sink::Stream(Announcer::start(url, ready, api.subscriber_gauge(), self.timeout)?)
            }
        })
    }
}

/// An `--advertise-url` as the queen will use it: http(s), without a trailing `/` (the
/// queen appends `/v1/...` to it verbatim).
fn advertised(url: &str) -> Result<String, Error> {
    let err =
        |reason: &str| Error::io("--advertise-url", std::io::Error::other(format!("`{url}`: {reason}")));
    let parsed = reqwest::Url::parse(url).map_err(|e| err(&e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
        return Err(err("needs to be an http:// or https:// URL with a host"));
    }
    Ok(url.trim_end_matches('/').to_string())
}

/// The pull API's own address, with the host name when it listens on every address.
fn advertised_from(addr: std::net::SocketAddr) -> String {
    match addr.ip() {
        ip if ip.is_unspecified() => format!("http://{}:{}", hostname(), addr.port()),
        std::net::IpAddr::V6(ip) => format!("http://[{ip}]:{}", addr.port()),
        std::net::IpAddr::V4(ip) => format!("http://{ip}:{}", addr.port()),
    }
}

/// Settings only a restart applies: the probes, the NVML library and the listening socket
/// are set up once.
fn fixed(config: &Config) -> impl PartialEq + std::fmt::Debug + '_ {
    (
        (&config.slice, &config.cgroup_root, &config.nvml_lib, &config.listen, &config.api_token_file),
        config.max_workers,
        (&config.record, config.record_retention, config.record_max_size),
    )
}

/// SIGHUP: the config file read again and what changed applied. A file that does not parse
/// changes nothing (the error is logged).
fn reload(
    args: &RunArgs,
    config: &mut Config,
    settings: &mut Settings,
    sampler: &mut Sampler,
    sink: &mut Sink,
    api: &PullApi,
) {
    let Some(path) = &args.cgroup.config else {
        return log::info!("SIGHUP: no --config file to read again");
    };
    let new = match Config::load(path)
        .map_err(Error::from)
        .and_then(|c| Settings::resolve(args, &c).map(|s| (c, s)))
    {
        Ok(new) => new,
        Err(e) => return log::error!("SIGHUP: {e}; keeping the running settings"),
    };
    if fixed(&new.0) != fixed(config) {
        log::warn!(
            "SIGHUP: slice, cgroup_root, nvml_lib, listen, api_token_file, max_workers and record* \
             change only on restart"
        );
    }
    if (&new.1.coordinator, new.1.protocol, &new.1.advertise_url, &new.1.token_file, new.1.timeout)
        != (
            &settings.coordinator,
            settings.protocol,
            &settings.advertise_url,
            &settings.token_file,
            settings.timeout,
        )
        || (settings.protocol == Protocol::Stream && new.1.hive_id != settings.hive_id)
    {
        match new.1.sink(api) {
            Ok(s) => *sink = s,
            Err(e) => return log::error!("SIGHUP: {e}; keeping the running settings"),
        }
    }
    sampler.set_prewarm_threshold(new.1.prewarm_threshold_pct);
    sampler.set_model_dir(new.1.model_dir.clone());
    if new.1 != *settings {
        log::info!("SIGHUP: now {:?}", new.1);
    }
    (*config, *settings) = new;
}

fn run(args: RunArgs) -> Result<(), Error> {
    // Flags, then the config file, then defaults.
    let (mut config, slice) = args.cgroup.load()?;
    let _lock = SliceLock::take(&slice.dir())?;
    raise_fd_limit();
    let mut settings = Settings::resolve(&args, &config)?;
    let api_token =
        args.api_token_file.as_ref().or(config.api_token_file.as_ref()).map(|p| read_token(p)).transpose()?;
    let options = SamplerOptions {
        nvml_lib: args.nvml_lib.clone().or_else(|| config.nvml_lib.clone()),
        prewarm_threshold_pct: settings.prewarm_threshold_pct,
        model_dir: settings.model_dir.clone(),
        bpf: if args.no_bpf { BpfMode::Off } else { BpfMode::Preferred },
        map_sizes: MapSizes {
            workers: args.max_workers.or(config.max_workers).unwrap_or(MapSizes::default().workers),
        },
        withhold: crate::probes::withheld_from_env(),
    };

    let mut sampler = Sampler::with_options(slice, options)?;
    // Capabilities are per thread and inherited: dropped before any other thread starts
    // (the helper threads then drop what is left, `privilege::spawn_unprivileged`).
    crate::privilege::drop_unneeded()?;
    let otlp = match args.otlp_endpoint.as_ref().or(config.otlp_endpoint.as_ref()) {
        Some(url) => Some(crate::sinks::otlp::Otlp::start(url, &hostname(), settings.timeout)?),
        None => None,
    };
    let api = PullApi::start(args.listen.or(config.listen).unwrap_or_else(default_listen), api_token)?;
    log::info!(
        "watching {} every {}",
        sampler.slice().dir().display(),
        humantime::format_duration(settings.interval)
    );
    let mut sink = settings.sink(&api)?;
    let recorder = match args.record.as_ref().or(config.record.as_ref()) {
        Some(dir) => Some(crate::record::Recorder::start(
            dir.clone(),
            crate::record::Limits {
                retention: args
                    .record_retention
                    .or(config.record_retention)
                    .unwrap_or(crate::record::DEFAULT_RETENTION),
                max_size: args
                    .record_max_size
                    .or(config.record_max_size)
                    .unwrap_or(crate::record::DEFAULT_MAX_SIZE),
            },
        )?),
        None => None,
    };
    let mut interval_ns = settings.interval.as_nanos() as u64;
    let mut server_status: Option<String> = None;
    let started = monotonic_ns();
    let mut deadline = started;
    let mut sent = 0u64;
    // SIGTERM or SIGINT: one last heartbeat saying "stopping", then exit 0 (the probes are
    // detached when they are dropped). SIGHUP: read the config file again.
    let signals = Signals::install()?;
    let mut hive = identity(settings.hive_id.clone());
    while args.count.is_none_or(|n| sent < n) {
        // Fixed deadlines, so the cadence does not drift; a missed one is skipped, not bunched.
        let stopping = loop {
            let mut next = deadline + interval_ns;
            let now = monotonic_ns();
            if next < now {
                next += (now - next).div_ceil(interval_ns) * interval_ns;
            }
            match signals.wait_until(next) {
                Woken::Deadline => {
                    deadline = next;
                    break false;
                }
                Woken::Stop => {
                    deadline = next.min(monotonic_ns());
                    break true;
                }
                // Reload, then wait again: the interval being waited out may have changed.
                Woken::Hangup => {
                    reload(&args, &mut config, &mut settings, &mut sampler, &mut sink, &api);
                    interval_ns = settings.interval.as_nanos() as u64;
                    hive = identity(settings.hive_id.clone());
                }
            }
        };
        let sample = sampler.sample()?;
        let mut heartbeat = heartbeat::format(&sample, &hive, (sample.at_ns - started) / 1_000_000_000);
        if stopping {
            heartbeat.hive.operational_status = "stopping".into();
        }
        heartbeat.collector.stream_subscribers = api.subscribers();
        heartbeat.collector.record = recorder.as_ref().map(|r| r.health());
        if heartbeat.workers.is_empty() && sent == 0 {
            log::info!(
                "no workers in {} yet; start one with `hive-monitor spawn --group llm --instance 8080 -- CMD`, \
                 or watch demo workers with `cargo xtask demo` (from the repository)",
                sampler.slice().dir().display()
            );
        }
        let heartbeat = Arc::new(heartbeat);
        api.publish(Arc::clone(&heartbeat));
        if let Some(r) = &recorder {
            r.record(&heartbeat);
        }
        if let Some(o) = &otlp {
            o.send(&heartbeat);
        }
        match &mut sink {
            Sink::Stdout(out) => match out.send(&heartbeat) {
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
                Err(e) => return Err(Error::io("standard output", e)),
                Ok(()) => {}
            },
            Sink::Stream(_) => {}
            Sink::Push(c) => {
                c.send(&heartbeat);
                if let Some(ack) = c.take_ack() {
                    interval_ns = follow_ack(ack, interval_ns, &mut server_status);
                }
            }
        }
        // Read by `cargo xtask bench` (RUST_LOG=latency=debug).
        log::debug!(
            target: "latency",
            "heartbeat {} handed to the sink {} us after its interval ended",
            heartbeat.seq,
            monotonic_ns().saturating_sub(deadline) / 1000
        );
        sent += 1;
        if stopping {
            log::info!("stopping after heartbeat {}", heartbeat.seq);
            break;
        }
    }
    Ok(())
}

/// A push coordinator's acknowledgement: its status logged when it changes, and the interval
/// it asks for taken when within `ACK_INTERVAL_MS`. Returns the interval to keep.
fn follow_ack(ack: monitor_wire::ack::Ack, interval_ns: u64, server_status: &mut Option<String>) -> u64 {
    if ack.server_status.is_some() && ack.server_status != *server_status {
        log::info!("coordinator status: {}", ack.server_status.as_deref().unwrap_or("?"));
        *server_status = ack.server_status;
    }
    match ack.next_interval_ms {
        Some(ms) if ACK_INTERVAL_MS.contains(&ms) && ms * 1_000_000 != interval_ns => {
            log::info!("coordinator asks for a heartbeat every {ms} ms");
            ms * 1_000_000
        }
        Some(ms) if !ACK_INTERVAL_MS.contains(&ms) => {
            log::warn!("coordinator asked for next_interval_ms {ms}, outside {ACK_INTERVAL_MS:?}; ignored");
            interval_ns
        }
        _ => interval_ns,
    }
}

/// The sampler keeps two files open per worker (its `cgroup.procs` and a memory file or
/// its processes' `statm`) to re-read them each interval; the usual soft limit of 1024
/// descriptors would not hold a thousand workers. Up to the hard limit is ours to take.
fn raise_fd_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid pointers to a rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                log::debug!("open files limit stays low: {}", std::io::Error::last_os_error());
            }
        }
    }
}

fn identity(hive_id: Option<String>) -> HiveIdentity {
    let hostname = hostname();
    HiveIdentity { id: hive_id.unwrap_or_else(|| hostname.clone()), hostname, port: DEFAULT_PORT }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is writable for its length; the result is NUL-terminated on success.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}
