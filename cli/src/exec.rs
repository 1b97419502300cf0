//! `brig exec`: run another process in a running container, as `docker exec` does: with the
//! container's user, environment and working directory unless told otherwise.
//!
//! With `--process FILE` it is the OCI runtime CLI's exec, as runc's: the whole process comes
//! as JSON, `--pid-file` names the process that stands for it on the host (this `brig`, or
//! with `--detach` a keeper left behind, as `create`'s), which keeps the stdio `exec` was
//! given and exits with the process's status.

use anyhow::Context;
use brig_runtime::container::{Container, ExecConfig};
use brig_runtime::state::Layout;
use brig_runtime::Sandbox;

use crate::relay;
use crate::EXIT_BRIG_ERROR;

/// Arguments of `brig exec`.
#[derive(clap::Args, Debug)]
pub struct ExecArgs {
    /// Keep stdin open and send it to the process.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Give the process a terminal.
    #[arg(short = 't', long)]
    tty: bool,
    /// Set an environment variable (on top of the container's).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Working directory (default: the container's).
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    workdir: Option<String>,
    /// User to run as: UID or UID:GID (default: the container's).
    #[arg(short = 'u', long = "user", value_name = "UID[:GID]")]
    user: Option<String>,
    /// OCI runtime CLI: the process to run, as OCI `process` JSON (instead of a command).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["env", "workdir", "user"])]
    process: Option<std::path::PathBuf>,
    /// OCI runtime CLI: write the PID of the process that stands for the exec here.
    #[arg(long, value_name = "FILE")]
    pid_file: Option<std::path::PathBuf>,
    /// OCI runtime CLI: return once the process runs (a keeper waits for it).
    #[arg(short = 'd', long)]
    detach: bool,
    /// OCI runtime CLI: a Unix socket to send the process's terminal to (with
    /// process.terminal): the master of a host PTY, sent with SCM_RIGHTS, as runc does.
    #[arg(long, value_name = "SOCKET")]
    console_socket: Option<std::path::PathBuf>,
    /// Container ID or name.
    id: String,
    /// Command and arguments.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        required_unless_present = "process"
    )]
    command: Vec<String>,
}

pub fn run(args: ExecArgs, layout: &Layout) -> anyhow::Result<u8> {
    if args.process.is_some() {
        return run_oci(args, layout);
    }
    let container = Container::load(layout, &args.id)?;
    let exec = ExecConfig {
        exec_id: format!("exec-{}", std::process::id()),
        args: args.command.clone(),
        env: args.env.clone(),
        cwd: args.workdir.clone(),
        user: args.user.clone(),
        terminal: args.tty,
        stdin: args.interactive,
    };
    // Bad input is an error before anything reaches the guest.
    let process = exec.process(container.state().process.as_ref())?;
    launch(
        layout,
        Launch {
            container,
            exec_id: exec.exec_id,
            process,
            stdin: exec.stdin,
            pid_file: None,
            ready: None,
        },
    )
}

/// The OCI runtime CLI's exec: the process from `--process`, run in the foreground or (with
/// `--detach`) by a keeper that `exec` leaves behind once the process runs.
fn run_oci(args: ExecArgs, layout: &Layout) -> anyhow::Result<u8> {
    let path = args.process.as_deref().unwrap_or(std::path::Path::new(""));
    let file =
        std::fs::File::open(path).with_context(|| format!("--process {}", path.display()))?;
    let process: oci_spec::runtime::Process =
        crate::read_json_arg(file, "--process", path, "an OCI process")?;
    crate::console::check(
        process.terminal() == Some(true),
        args.console_socket.as_deref(),
        args.detach,
    )?;
    let container = Container::load(layout, &args.id)?;
    let ready = crate::create::keeper_ready()?;
    if args.detach && ready.is_none() {
        return crate::create::spawn_keeper(&format!("started {}", args.id));
    }
    // Here, in the process that stays (the keeper with --detach): our stdin and stdout
    // become the terminal the engine holds the other end of.
    if let Some(socket) = &args.console_socket {
        crate::console::take_terminal(socket)?;
    }
    let pid_file = args.pid_file.map(std::path::absolute).transpose()?;
    launch(
        layout,
        Launch {
            container,
            exec_id: format!("exec-{}", std::process::id()),
            process,
            stdin: true,
            pid_file,
            ready,
        },
    )
}

/// One exec to run, as either form of `brig exec` asks for it.
struct Launch {
    container: Container,
    exec_id: String,
    process: oci_spec::runtime::Process,
    /// Send our stdin to it.
    stdin: bool,
    /// Where our PID goes once it runs (it stands for the process on the host).
    pid_file: Option<std::path::PathBuf>,
    /// A keeper's ready pipe: told once it runs.
    ready: Option<std::fs::File>,
}

/// Run the exec, relay its stdio (raw terminal and size with `process.terminal`) until it
/// ends: its exit status, or 126/127 when it could not be executed or found.
fn launch(layout: &Layout, launch: Launch) -> anyhow::Result<u8> {
    let Launch {
        container,
        exec_id,
        process,
        stdin,
        pid_file,
        ready,
    } = launch;
    let id = container.id().to_string();
    let tty = process.terminal() == Some(true);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let code = rt.block_on(async {
        let sandbox = Sandbox::open(layout.root(), &container.state().sandbox_id)
            .await
            .with_context(|| format!("reaching container {id}"))?;
        let stdio = match container
            .run_process(&sandbox, &exec_id, &process, stdin)
            .await
        {
            Ok(stdio) => stdio,
            Err(e) => {
                eprintln!("brig: {e}");
                return anyhow::Ok(e.command_status().unwrap_or(EXIT_BRIG_ERROR));
            }
        };
        if let Some(path) = &pid_file {
            crate::create::write_pid_file(path)?;
        }
        if let Some(mut ready) = ready {
            use std::io::Write;
            writeln!(ready, "started {id}").context("telling brig exec")?;
        }
        let raw = tty.then(relay::RawTerminal::enter);
        // Size changes of our terminal (SIGWINCH) follow it into the guest, as for `brig run -t`.
        let resizing = tty.then(|| follow_resizes(&sandbox, &id, &exec_id));
        if let (true, Some((rows, cols))) = (tty, relay::terminal_size()) {
            let _ = sandbox
                .agent()
                .resize_tty(&id, &exec_id, rows.into(), cols.into())
                .await;
        }
        relay::relay(stdio, None).await;
        let status = sandbox.agent().wait_process(&id, &exec_id).await?;
        if let Some(resizing) = resizing {
            resizing.abort();
        }
        drop(raw);
        anyhow::Ok(u8::try_from(status.exit_status).unwrap_or(EXIT_BRIG_ERROR))
    });
    rt.shutdown_background();
    code
}

/// Send our terminal's size to the exec each time it changes (SIGWINCH). The handler is in
/// place when this returns, so no change after it is missed.
fn follow_resizes(sandbox: &Sandbox, id: &str, exec_id: &str) -> tokio::task::JoinHandle<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let agent = sandbox.agent().clone();
    let (id, exec_id) = (id.to_string(), exec_id.to_string());
    let winch = signal(SignalKind::window_change());
    tokio::spawn(async move {
        let Ok(mut winch) = winch else { return };
        while winch.recv().await.is_some() {
            if let Some((rows, cols)) = relay::terminal_size() {
                let _ = agent
                    .resize_tty(&id, &exec_id, rows.into(), cols.into())
                    .await;
            }
        }
    })
}
