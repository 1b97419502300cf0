//! `brig ps`: the containers this state root knows.

use crate::state::Layout;

/// Arguments of `brig ps`.
#[derive(clap::Args, Debug)]
pub struct PsArgs {
    /// Show exited containers too.
    #[arg(short = 'a', long)]
    all: bool,
}

pub fn run(args: PsArgs, layout: &Layout) -> anyhow::Result<u8> {
    println!("{:<14} {:<16} {:<20} COMMAND", "CONTAINER ID", "STATUS", "CREATED");
    for id in layout.ids() {
        let Ok(state) = layout.load(&id) else { continue };
        if state.status != "running" && !args.all {
            continue;
        }
        let status = match (state.status.as_str(), state.exit_code) {
            ("exited", Some(code)) => format!("exited ({code})"),
            (s, _) => s.to_string(),
        };
        let age = crate::state::now().saturating_sub(state.created);
        println!("{:<14} {:<16} {:<20} {}", id, status, format!("{age} s ago"), state.command.join(" "));
    }
    Ok(0)
}
