//! `brig-agent`: PID 1 of the Brig guest (see the library's documentation).

fn main() -> std::process::ExitCode {
    brig_agent::main()
}
