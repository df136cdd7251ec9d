use std::{path::PathBuf, process::ExitCode};

use clap::Parser;

/// A reference coordinator for hive-monitor hives.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7833")]
    listen: std::net::SocketAddr,
    /// File holding the bearer token hives must send; needed off loopback.
    #[arg(long)]
    token_file: Option<PathBuf>,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let token = match args.token_file.as_deref().map(monitor_coordinator::http::read_token_file).transpose() {
        Ok(t) => t,
        Err(e) => {
            log::error!("{}: {e}", args.token_file.unwrap_or_default().display());
            return ExitCode::FAILURE;
        }
    };
    match monitor_coordinator::run(args.listen, token) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
