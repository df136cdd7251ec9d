//! The `hive-monitor` command line, built inside this package so its tests can run it.
fn main() -> std::process::ExitCode {
    monitor_user::cli::main()
}
