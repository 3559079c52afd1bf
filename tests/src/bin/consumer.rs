//! `outbox-consumer`, built inside the test crate so tests can run it as a child process.
fn main() -> std::process::ExitCode {
    outbox_consumer::cli::main()
}
