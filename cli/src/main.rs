//! `brig`: run containers in microVMs. A thin adapter over `brig-runtime`.

mod boot;
mod check;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit status for errors of Brig itself (bad input, missing files), as runc and docker use.
pub const EXIT_BRIG_ERROR: u8 = 125;

/// Run OCI containers in KVM microVMs.
#[derive(Parser, Debug)]
#[command(name = "brig", version, about)]
struct Cli {
    /// Log verbosity for Brig's own messages (error, warn, info, debug, trace).
    #[arg(long, global = true, default_value = "warn", env = "BRIG_LOG")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Tell what this host can do: KVM flavour, vsock, tun, cgroups. Exit 0 only when Brig
    /// can boot guests directly here.
    Check(check::CheckArgs),
    /// Boot a sandbox microVM, print the agent's version (received over vsock) and the boot
    /// time, then power it off.
    Boot(boot::BootArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_BRIG_ERROR } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log_level))
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Check(args) => check::run(args),
        Command::Boot(args) => boot::run(args),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("brig: {e:#}");
            ExitCode::from(EXIT_BRIG_ERROR)
        }
    }
}
