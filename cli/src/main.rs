//! `brig`: run containers in microVMs. A thin adapter over `brig-runtime`.

mod boot;
mod check;
mod console;
mod create;
mod delete;
mod events;
mod exec;
mod features;
mod hooks;
mod images;
mod kill;
mod logs;
mod pause;
mod port;
mod ps;
mod relay;
mod rm;
mod run;
mod state;
mod update;

use std::process::ExitCode;

use brig_runtime::state::Layout;
use clap::{Parser, Subcommand};

/// Write one line to stdout. `Ok(false)` once the reader is gone (`brig ps | head -1`): not
/// an error of ours, and nothing more should be written (a plain `println!` would panic).
pub(crate) fn out(line: std::fmt::Arguments<'_>) -> std::io::Result<bool> {
    use std::io::Write;
    match writeln!(std::io::stdout().lock(), "{line}") {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e),
    }
}

/// `println!` for output a reader may stop reading early: see [`out`].
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::out(format_args!($($arg)*))
    };
}
pub(crate) use outln;

/// Largest JSON an OCI runtime CLI flag names (`exec --process`, `update --resources`): such
/// objects are a few KiB.
const MAX_JSON_ARG: u64 = 1 << 20;

/// The JSON object `flag` names, read from `reader` (at most [`MAX_JSON_ARG`] bytes) as a
/// `kind`; errors name the flag and `path`.
pub(crate) fn read_json_arg<T: serde::de::DeserializeOwned>(
    reader: impl std::io::Read,
    flag: &str,
    path: &std::path::Path,
    kind: &str,
) -> anyhow::Result<T> {
    use anyhow::Context;
    use std::io::Read;
    let what = format!("{flag} {}", path.display());
    let mut json = String::new();
    reader
        .take(MAX_JSON_ARG + 1)
        .read_to_string(&mut json)
        .with_context(|| format!("reading {what}"))?;
    anyhow::ensure!(
        json.len() as u64 <= MAX_JSON_ARG,
        "{what} is over {MAX_JSON_ARG} bytes"
    );
    serde_json::from_str(&json).with_context(|| format!("{what} is not {kind}"))
}

/// Exit status for errors of Brig itself (bad input, missing files), as runc and docker use.
pub const EXIT_BRIG_ERROR: u8 = 125;

/// Run OCI containers in KVM microVMs.
#[derive(Parser, Debug)]
#[command(name = "brig", version, about)]
struct Cli {
    /// Log verbosity for Brig's own messages (error, warn, info, debug, trace).
    #[arg(long, global = true, default_value = "warn", env = "BRIG_LOG")]
    log_level: String,
    /// State directory (default: from brig.toml, else /run/brig).
    #[arg(long, global = true, env = "BRIG_ROOT")]
    root: Option<std::path::PathBuf>,
    /// Also write Brig's errors to this file (runc's --log; engines read it when a call
    /// fails).
    #[arg(long, global = true, value_name = "FILE")]
    log: Option<std::path::PathBuf>,
    /// The format of --log: text or json (runc's).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Accepted as runc's: a container the CLI runs stays in its caller's host cgroup.
    #[arg(long = "systemd-cgroup", global = true)]
    _systemd_cgroup: bool,
    #[command(subcommand)]
    command: Command,
}

/// How `--log` records are written.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    /// `level=error msg="…"`, as runc's text logs.
    Text,
    /// `{"level":"error","msg":"…"}`, one object a line, as runc's JSON logs.
    Json,
}

/// Append an error record to the `--log` file (best effort: the error is on stderr too).
fn log_error(path: &std::path::Path, format: LogFormat, message: &str) {
    use std::io::Write;
    let line = match format {
        LogFormat::Json => serde_json::json!({ "level": "error", "msg": message }).to_string(),
        LogFormat::Text => format!("level=error msg={message:?}"),
    };
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(file, "{line}");
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Tell what this host can do: KVM flavour, vsock, tun, cgroups. Exit 0 only when Brig
    /// can boot guests directly here.
    Check(check::CheckArgs),
    /// Boot a sandbox microVM, print the agent's version (received over vsock) and the boot
    /// time, then power it off.
    Boot(boot::BootArgs),
    /// Run a command in a new container, in its own microVM.
    Run(run::RunArgs),
    /// Pull an image into the image store.
    Pull(images::PullArgs),
    /// List the images in the store.
    Images(images::ImagesArgs),
    /// Remove images (and the layers no other image uses).
    Rmi(images::RmiArgs),
    /// List containers.
    Ps(ps::PsArgs),
    /// Run another process in a running container.
    Exec(exec::ExecArgs),
    /// Show what a detached container wrote.
    Logs(logs::LogsArgs),
    /// List the ports a container publishes on the host (`-p`, `-P`).
    Port(port::PortArgs),
    /// Send a signal to a container.
    Kill(kill::KillArgs),
    /// Remove containers (-f: stop them first).
    Rm(rm::RmArgs),
    /// Freeze every process of a running container.
    Pause(pause::PauseArgs),
    /// Thaw a paused container.
    Resume(pause::PauseArgs),
    /// Change a container's limits (memory, CPU, cpuset, pids).
    Update(update::UpdateArgs),
    /// Print a container's statistics (--stats) or follow its OOM events, as JSON.
    Events(events::EventsArgs),
    /// OCI runtime CLI (as runc's): set a container up from a bundle, its command waiting
    /// for `start`.
    Create(create::CreateArgs),
    /// OCI runtime CLI: run the command of a created container.
    Start(create::StartArgs),
    /// OCI runtime CLI: print a container's state as JSON.
    State(state::StateArgs),
    /// OCI runtime CLI: remove a container (a running one with --force).
    Delete(delete::DeleteArgs),
    /// OCI runtime CLI: what this runtime supports, as the OCI features JSON.
    Features,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            let _ = e.print(); // --help, --version
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line naming the problem, as runc and docker do; usage is one --help away.
            let rendered = e.render().to_string();
            let first = rendered.lines().next().unwrap_or("invalid arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("brig: {first} (see brig --help)");
            return ExitCode::from(EXIT_BRIG_ERROR);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(log_filter(&cli.log_level))
        .with_writer(std::io::stderr)
        .init();
    let (log, log_format) = (cli.log.clone(), cli.log_format);
    let result = match cli.command {
        Command::Check(args) => check::run(args),
        Command::Boot(args) => boot::run(args, cli.root),
        Command::Run(args) => run::run(args, cli.root),
        Command::Pull(args) => images::pull(args),
        Command::Images(args) => images::images(args),
        Command::Rmi(args) => with_layout(cli.root, |l| images::rmi(args, l)),
        Command::Ps(args) => with_layout(cli.root, |l| ps::run(args, l)),
        Command::Exec(args) => with_layout(cli.root, |l| exec::run(args, l)),
        Command::Logs(args) => with_layout(cli.root, |l| logs::run(args, l)),
        Command::Port(args) => with_layout(cli.root, |l| port::run(args, l)),
        Command::Kill(args) => with_layout(cli.root, |l| kill::run(args, l)),
        Command::Rm(args) => with_layout(cli.root, |l| rm::run(args, l)),
        Command::Pause(args) => with_layout(cli.root, |l| pause::run(args, l, true)),
        Command::Resume(args) => with_layout(cli.root, |l| pause::run(args, l, false)),
        Command::Update(args) => with_layout(cli.root, |l| update::run(args, l)),
        Command::Events(args) => with_layout(cli.root, |l| events::run(args, l)),
        Command::Create(args) => create::run(args, cli.root),
        Command::Start(args) => with_layout(cli.root, |l| create::start(args, l)),
        Command::State(args) => with_layout(cli.root, |l| state::run(args, l)),
        Command::Delete(args) => with_layout(cli.root, |l| delete::run(args, l)),
        Command::Features => features::run(),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("brig: {e:#}");
            if let Some(path) = &log {
                log_error(path, log_format, &format!("{e:#}"));
            }
            ExitCode::from(EXIT_BRIG_ERROR)
        }
    }
}

/// The user's log filter, with ttrpc's own messages off unless the filter names ttrpc: when a
/// microVM dies, ttrpc logs the broken connection at ERROR on every call in flight, and Brig
/// already reports that in its one line of error.
fn log_filter(level: &str) -> tracing_subscriber::EnvFilter {
    if level.contains("ttrpc") {
        tracing_subscriber::EnvFilter::new(level)
    } else {
        tracing_subscriber::EnvFilter::new(format!("{level},ttrpc=off"))
    }
}

/// The state layout under `--root`, or the configured root.
fn with_layout(
    root: Option<std::path::PathBuf>,
    f: impl FnOnce(&Layout) -> anyhow::Result<u8>,
) -> anyhow::Result<u8> {
    let root = match root {
        Some(r) => r,
        None => brig_runtime::RuntimeConfig::load()
            .map(|c| c.root)
            .unwrap_or_else(|_| "/run/brig".into()),
    };
    f(&Layout::new(&root))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_reach_the_log_file_in_runcs_formats() {
        let path = std::env::temp_dir().join(format!("brig-log-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        log_error(&path, LogFormat::Json, "container x does not exist");
        log_error(&path, LogFormat::Text, "a \"quoted\" word");
        let text = std::fs::read_to_string(&path).unwrap();
        let mut lines = text.lines();
        let json: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
        assert_eq!(json["level"], "error");
        assert_eq!(json["msg"], "container x does not exist");
        assert_eq!(lines.next(), Some(r#"level=error msg="a \"quoted\" word""#));
        std::fs::remove_file(&path).unwrap();
    }
}
