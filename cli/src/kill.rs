//! `brig kill`: send a signal to a container's init process.

use anyhow::Context;
use brig_runtime::container::Container;
use brig_runtime::signal::parse_signal;
use brig_runtime::state::Layout;
use brig_runtime::Sandbox;

/// Arguments of `brig kill`.
#[derive(clap::Args, Debug)]
pub struct KillArgs {
    /// Container ID or name.
    id: String,
    /// Signal name or number (default KILL, as docker).
    #[arg(default_value = "KILL")]
    signal: String,
    /// Signal every process of the container, not only its init (runc's --all).
    #[arg(short = 'a', long)]
    all: bool,
}

pub fn run(args: KillArgs, layout: &Layout) -> anyhow::Result<u8> {
    let signal = parse_signal(&args.signal)?;
    let container = Container::load(layout, &args.id)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let sandbox = Sandbox::open(layout.root(), &container.state().sandbox_id)
            .await
            .with_context(|| format!("reaching container {}", args.id))?;
        container.signal(&sandbox, signal, args.all).await?;
        anyhow::Ok(0)
    })
}
