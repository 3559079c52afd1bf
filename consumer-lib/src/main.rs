fn main() -> std::process::ExitCode {
    outbox_consumer::cli::main()
}
