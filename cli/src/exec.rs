//! `brig exec`: run another process in a running container.

use anyhow::Context;
use brig_runtime::agent::AgentClient;
use brig_runtime::container;

use crate::relay;
use crate::state::Layout;
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
    /// Container ID or name.
    id: String,
    /// Command and arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    command: Vec<String>,
}

pub fn run(args: ExecArgs, layout: &Layout) -> anyhow::Result<u8> {
    let state = layout.load(&args.id)?;
    anyhow::ensure!(state.status == "running", "container {} is not running", args.id);
    let uds = layout.sandbox(&args.id).join("vsock.sock");
    let process = serde_json::json!({
        "terminal": args.tty,
        "user": { "uid": 0, "gid": 0 },
        "args": args.command,
        "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
        "cwd": "/",
    });
    let exec_id = format!("exec-{}", std::process::id());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let code = rt.block_on(async {
        let agent = AgentClient::connect(&uds, std::time::Duration::from_secs(10))
            .await
            .with_context(|| format!("reaching container {}", args.id))?;
        let stdio = match container::exec_process(&agent, &uds, &args.id, &exec_id, process.to_string(), args.interactive, args.tty).await {
            Ok(stdio) => stdio,
            Err(e) => {
                eprintln!("brig: {e}");
                return anyhow::Ok(crate::run::create_error_status(&e));
            }
        };
        let raw = args.tty.then(relay::RawTerminal::enter);
        if let (true, Some((rows, cols))) = (args.tty, relay::terminal_size()) {
            let _ = agent.resize_tty(&args.id, &exec_id, rows.into(), cols.into()).await;
        }
        relay::relay(stdio, None).await;
        let status = agent.wait_process(&args.id, &exec_id).await?;
        drop(raw);
        anyhow::Ok(u8::try_from(status.exit_status).unwrap_or(EXIT_BRIG_ERROR))
    });
    rt.shutdown_background();
    code
}
