//! `brig ps`: the containers this state root knows.

use brig_runtime::state::{now, Layout, Status};

/// Arguments of `brig ps`.
#[derive(clap::Args, Debug)]
pub struct PsArgs {
    /// Show exited containers too.
    #[arg(short = 'a', long)]
    all: bool,
}

pub fn run(args: PsArgs, layout: &Layout) -> anyhow::Result<u8> {
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
