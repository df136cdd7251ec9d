//! The `hive-monitor` command line: subcommands wire probes, sources, sampler and sinks
//! together, nothing more.
use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{
    error::Error,
    heartbeat::{Heartbeat, HiveIdentity},
    probes::monotonic_ns,
    sampler::{Sampler, SamplerOptions},
    sinks::{api::PullApi, coordinator::Coordinator, stdout::Stdout},
    sources::cgroup::{self, Slice},
    spawn, top,
};

/// Port the hive advertises in its heartbeat (the reference's default).
const DEFAULT_PORT: u16 = 7835;

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
    /// Print the heartbeat's JSON Schema.
    Schema,
}

#[derive(Args)]
struct TopArgs {
    #[command(flatten)]
    cgroup: CgroupArgs,
    /// Where the local daemon's pull API listens.
    #[arg(long, default_value = "127.0.0.1:7835")]
    listen: String,
    /// Refresh period: `1s`, `500ms`, … (10ms to 1h).
    #[arg(long, default_value = "1s", value_parser = parse_interval)]
    interval: Duration,
    /// Identity of this host [default: the host name].
    #[arg(long)]
    hive_id: Option<String>,
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
    #[arg(long, value_parser = spawn::parse_size)]
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
    /// The slice's path below the cgroup2 root; may be nested (`a/b/rbee.slice`).
    #[arg(long, default_value = "rbee.slice")]
    slice: String,
    /// The cgroup2 mount [default: /sys/fs/cgroup on unified hosts, /sys/fs/cgroup/unified on hybrid ones].
    #[arg(long)]
    cgroup_root: Option<PathBuf>,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    cgroup: CgroupArgs,
    /// Time between heartbeats: `1s`, `500ms`, … (10ms to 1h).
    #[arg(long, default_value = "1s", value_parser = parse_interval)]
    interval: Duration,
    /// Exit 0 after this many heartbeats.
    #[arg(long)]
    count: Option<u64>,
    /// Identity of this host in heartbeats [default: the host name].
    #[arg(long)]
    hive_id: Option<String>,
    /// NVML library to load instead of the system's libnvidia-ml.so.
    #[arg(long)]
    nvml_lib: Option<PathBuf>,
    /// GPU utilisation (%) above which a pre-warm signal is sent (at most once a minute per device).
    #[arg(long, default_value_t = 80.0, value_parser = parse_percent)]
    prewarm_threshold: f64,
    /// Directory the models are stored in; its file system's usage goes in each heartbeat.
    #[arg(long)]
    model_dir: Option<PathBuf>,
    /// POST heartbeats to `URL/v1/hive-heartbeat` instead of printing them.
    #[arg(long, value_name = "URL")]
    coordinator: Option<String>,
    /// File holding the bearer token for the coordinator.
    #[arg(long, requires = "coordinator")]
    token_file: Option<PathBuf>,
    /// Timeout of each request to the coordinator.
    #[arg(long, default_value = "5s", value_parser = parse_interval)]
    timeout: Duration,
    /// Where the pull API (/v1/heartbeat, /v1/capabilities, /metrics, /healthz) listens;
    /// port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:7835")]
    listen: std::net::SocketAddr,
    /// File holding the bearer token the pull API requires; needed off loopback.
    #[arg(long)]
    api_token_file: Option<PathBuf>,
}

/// The bounds within which a coordinator's `next_interval_ms` is honoured.
const ACK_INTERVAL_MS: std::ops::RangeInclusive<u64> = 100..=60_000;

/// Where heartbeats go.
enum Sink {
    Stdout(Stdout),
    Coordinator(Coordinator),
}

fn read_token(path: &std::path::Path) -> Result<String, Error> {
    let token = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let token = token.trim();
    if token.is_empty() || token.contains(['\r', '\n']) {
        return Err(Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the token file must hold one non-empty line",
            ),
        ));
    }
    Ok(token.to_string())
}

fn parse_percent(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=100.0).contains(&v) => Ok(v),
        _ => Err(format!("`{s}` is not a percentage between 0 and 100")),
    }
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("`{s}`: {e} (examples: 1s, 500ms)"))?;
    if d < Duration::from_millis(10) || d > Duration::from_secs(3600) {
        return Err(format!("`{s}` is outside 10ms..1h"));
    }
    Ok(d)
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
        Command::Schema => {
            println!("{:#}", crate::heartbeat::schema());
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
    fn slice(&self) -> Result<Slice, Error> {
        let root = match &self.cgroup_root {
            Some(root) => root.clone(),
            None => cgroup::detect_root()?,
        };
        Slice::new(root, &self.slice)
    }
}

fn top(args: TopArgs) -> Result<(), Error> {
    top::run(args.cgroup.slice()?, &args.listen, args.interval, identity(args.hive_id))
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
    spawn::run(&args.cgroup.slice()?, &spec)
}

fn run(args: RunArgs) -> Result<(), Error> {
    let slice = args.cgroup.slice()?;
    let identity = identity(args.hive_id);

    let options = SamplerOptions {
        nvml_lib: args.nvml_lib,
        prewarm_threshold_pct: args.prewarm_threshold,
        model_dir: args.model_dir,
    };
    let token = args.token_file.as_deref().map(read_token).transpose()?;
    let api_token = args.api_token_file.as_deref().map(read_token).transpose()?;
    let mut sampler = Sampler::with_options(slice, options)?;
    let api = PullApi::start(args.listen, api_token)?;
    log::info!(
        "probes attached; watching {} every {}",
        sampler.slice().dir().display(),
        humantime::format_duration(args.interval)
    );
    let mut sink = match &args.coordinator {
        Some(url) => Sink::Coordinator(Coordinator::start(url, token, args.timeout)?),
        None => Sink::Stdout(Stdout::new()),
    };
    let mut interval_ns = args.interval.as_nanos() as u64;
    let mut server_status: Option<String> = None;
    let started = monotonic_ns();
    let mut deadline = started;
    let mut sent = 0u64;
    while args.count.is_none_or(|n| sent < n) {
        // Fixed deadlines, so the cadence does not drift; a missed one is skipped, not bunched.
        let now = monotonic_ns();
        deadline += interval_ns;
        if deadline < now {
            deadline += (now - deadline).div_ceil(interval_ns) * interval_ns;
        }
        std::thread::sleep(Duration::from_nanos(deadline - now));
        let sample = sampler.sample()?;
        let heartbeat = Heartbeat::new(&sample, &identity, (sample.at_ns - started) / 1_000_000_000);
        api.publish(&heartbeat);
        match &mut sink {
            Sink::Stdout(out) => match out.send(&heartbeat) {
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
                Err(e) => return Err(Error::io("standard output", e)),
                Ok(()) => {}
            },
            Sink::Coordinator(c) => {
                c.send(&heartbeat);
                if let Some(ack) = c.take_ack() {
                    if ack.server_status.is_some() && ack.server_status != server_status {
                        log::info!("coordinator status: {}", ack.server_status.as_deref().unwrap_or("?"));
                        server_status = ack.server_status;
                    }
                    match ack.next_interval_ms {
                        Some(ms) if ACK_INTERVAL_MS.contains(&ms) && ms * 1_000_000 != interval_ns => {
                            log::info!("coordinator asks for a heartbeat every {ms} ms");
                            interval_ns = ms * 1_000_000;
                        }
                        Some(ms) if !ACK_INTERVAL_MS.contains(&ms) => {
                            log::warn!("coordinator asked for next_interval_ms {ms}, outside {ACK_INTERVAL_MS:?}; ignored")
                        }
                        _ => {}
                    }
                }
            }
        }
        sent += 1;
    }
    Ok(())
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
