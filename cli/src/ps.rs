//! `brig ps`: the containers this state root knows; `brig ps ID`: the processes of one
//! container, as runc's `ps` lists them (PIDs are the guest's: the processes live there).

use anyhow::Context;
use brig_runtime::container::Container;
use brig_runtime::state::{now, Layout, Status};
use brig_runtime::Sandbox;

/// Arguments of `brig ps`.
#[derive(clap::Args, Debug)]
pub struct PsArgs {
    /// Show exited containers too.
    #[arg(short = 'a', long)]
    all: bool,
    /// With an ID: `table` (PID and command line) or `json` (an array of PIDs, as runc's).
    #[arg(short = 'f', long, value_name = "table|json", default_value = "table")]
    format: String,
    /// A container: list its processes instead of the containers.
    id: Option<String>,
}

pub fn run(args: PsArgs, layout: &Layout) -> anyhow::Result<u8> {
    if let Some(id) = &args.id {
        return processes(id, &args.format, layout);
    }
    if !crate::outln!(
        "{:<14} {:<16} {:<20} COMMAND",
        "CONTAINER ID",
        "STATUS",
        "CREATED"
    )? {
        return Ok(0);
    }
    for id in layout.container_ids() {
        let Ok(state) = layout.load(&id) else {
            continue;
        };
        // Paused containers are live too: docker and podman list them without -a.
        if !matches!(state.status, Status::Running | Status::Paused) && !args.all {
            continue;
        }
        // As docker says it: a stopped container has "exited".
        let status = match (state.status, state.exit_code) {
            (Status::Stopped, Some(code)) => format!("exited ({code})"),
            (Status::Stopped, None) => "exited".to_string(),
            (s, _) => s.as_str().to_string(),
        };
        let age = now().saturating_sub(state.created);
        if !crate::outln!(
            "{:<14} {:<16} {:<20} {}",
            id,
            status,
            format!("{age} s ago"),
            state.command.join(" ")
        )? {
            break;
        }
    }
    Ok(0)
}

/// `brig ps ID`: the container's processes, from its agent.
fn processes(id: &str, format: &str, layout: &Layout) -> anyhow::Result<u8> {
    anyhow::ensure!(
        format == "table" || format == "json",
        "--format {format:?}: use table or json"
    );
    let container = Container::load(layout, id)?;
    anyhow::ensure!(
        matches!(
            container.state().status,
            Status::Running | Status::Paused | Status::Created
        ),
        "container {id} is {}: only a live container has processes",
        container.state().status.as_str()
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let processes = rt.block_on(async {
        let sandbox = Sandbox::open(layout.root(), &container.state().sandbox_id)
            .await
            .with_context(|| format!("reaching container {id}"))?;
        anyhow::Ok(sandbox.agent().list_processes(id).await?)
    })?;
    if format == "json" {
        let pids: Vec<u32> = processes.iter().map(|p| p.pid).collect();
        crate::outln!("{}", serde_json::to_string(&pids)?)?;
        return Ok(0);
    }
    if !crate::outln!("{:>7} CMD", "PID")? {
        return Ok(0);
    }
    for p in &processes {
        // The command line is the guest's: shown with control characters escaped.
        let cmdline = brig_runtime::guest_text::line(&p.cmdline);
        if !crate::outln!("{:>7} {}", p.pid, cmdline)? {
            break;
        }
    }
    Ok(0)
}
