//! `brig exec`: run another process in a running container, as `docker exec` does: with the
//! container's user, environment and working directory unless told otherwise.

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
    /// Container ID or name.
    id: String,
    /// Command and arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    command: Vec<String>,
}

pub fn run(args: ExecArgs, layout: &Layout) -> anyhow::Result<u8> {
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
    exec.process(container.state().process.as_ref())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let code = rt.block_on(async {
        let sandbox = Sandbox::open(layout.root(), &container.state().sandbox_id)
            .await
            .with_context(|| format!("reaching container {}", args.id))?;
        let stdio = match container.exec(&sandbox, &exec).await {
            Ok(stdio) => stdio,
            Err(e) => {
                eprintln!("brig: {e}");
                return anyhow::Ok(e.command_status().unwrap_or(EXIT_BRIG_ERROR));
            }
        };
        let raw = args.tty.then(relay::RawTerminal::enter);
        if let (true, Some((rows, cols))) = (args.tty, relay::terminal_size()) {
            let _ = sandbox
                .agent()
                .resize_tty(&args.id, &exec.exec_id, rows.into(), cols.into())
                .await;
        }
        relay::relay(stdio, None).await;
        let status = sandbox
            .agent()
            .wait_process(&args.id, &exec.exec_id)
            .await?;
        drop(raw);
        anyhow::Ok(u8::try_from(status.exit_status).unwrap_or(EXIT_BRIG_ERROR))
    });
    rt.shutdown_background();
    code
}
