fn main() -> std::process::ExitCode {
    monitor_user::cli::main()
}
