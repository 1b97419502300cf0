//! `brig pause` / `brig resume`: freeze and thaw every process of a container, as runc does.

use anyhow::Context;
use brig_runtime::container::Container;
use brig_runtime::state::Layout;
use brig_runtime::Sandbox;

/// Arguments of `brig pause` and `brig resume`.
#[derive(clap::Args, Debug)]
pub struct PauseArgs {
    /// Container ID or name.
    id: String,
}

/// Pause (`pause` true) or resume the container.
pub fn run(args: PauseArgs, layout: &Layout, pause: bool) -> anyhow::Result<u8> {
    let mut container = Container::load(layout, &args.id)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let sandbox = Sandbox::open(layout.root(), &container.state().sandbox_id)
            .await
            .with_context(|| format!("reaching container {}", args.id))?;
        if pause {
            container.pause(&sandbox).await?;
        } else {
            container.resume(&sandbox).await?;
        }
        anyhow::Ok(0)
    })
}
